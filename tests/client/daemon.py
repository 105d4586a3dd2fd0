"""A real `gatewayd run` for the client and dashboard tests: thermostat + chat agents, the
WebSocket listener, optionally MQTT and the HTTP API with the dashboard."""

from __future__ import annotations

from pathlib import Path

from tests.brokers import free_port
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.notify import NotifySocket

TOKEN = "dashboard-test-token-0123456789"

BASE = """
[gateway]
state_dir = "state"
drain_timeout = "5s"
[http]
bind = "127.0.0.1:0"
[agents]
python_path = ["{repo}"]
[agents.classes.thermostat]
class = "gatewayd.examples.thermostat:Thermostat"
[agents.classes.chat]
class = "gatewayd.examples.chat:EchoChat"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
"""

API = """
[api]
enabled = true
bind = "127.0.0.1:{api_port}"
tokens_file = "tokens.toml"
[dashboard]
enabled = true
path = "/dashboard"
sample_interval = "{sample_interval}"
"""

MQTT = """
[mqtt]
enabled = true
broker_urls = ["{broker_url}"]
client_id = "gw-dash"
reconnect_max = "1s"
[[mqtt.routes]]
topic = "sensors/{{id}}/temp"
agent_class = "thermostat"
reply_topic = "sensors/{{id}}/cmd"
"""

TOKENS = """
[tokens.operator]
token = "{token}"
scopes = ["dashboard"]
"""


class Gateway:
    """Ports and the process of one test daemon."""

    def __init__(
        self,
        tmp_path: Path,
        notify: NotifySocket,
        *,
        api: bool = False,
        broker_url: str | None = None,
        sample_interval: str = "1s",
        extra: str = "",
    ) -> None:
        self.ws_port = free_port()
        self.api_port = free_port()
        text = BASE.format(repo=REPO, ws_port=self.ws_port)
        if api:
            text += API.format(api_port=self.api_port, sample_interval=sample_interval)
            (tmp_path / "tokens.toml").write_text(TOKENS.format(token=TOKEN))
        if broker_url is not None:
            text += MQTT.format(broker_url=broker_url)
        config = tmp_path / "gatewayd.toml"
        config.write_text(text + extra)
        self.process = GatewayProcess(config, notify)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"
