"""Shutdown, start-up and reload edge cases of a real daemon process (real NOTIFY_SOCKET, real
signals): one drain deadline, a second signal exits at once, a signal during start-up stops it,
a reload that fails for any reason keeps the running config and reports READY=1 again."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.brokers import MosquittoBroker, free_port
from tests.engine.onnx_models import build_spin
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.notify import NotifySocket

pytestmark = pytest.mark.timeout(90)

BASE = """
[gateway]
state_dir = "state"
drain_timeout = "{drain}"
status_interval = "1s"
[http]
bind = "127.0.0.1:0"
[agents]
python_path = ["{repo}", "{modules}"]
turn_timeout = "10m"
[agents.classes.hangs]
class = "tests.gatewayd.lifecycle_agents:Hangs"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
[mqtt]
enabled = false
"""


class Daemon(GatewayProcess):
    def __init__(self, tmp_path: Path, notify: NotifySocket, drain: str = "60s") -> None:
        super().__init__(tmp_path / "gatewayd.toml", notify)
        self.tmp_path = tmp_path
        self.ws_port = free_port()
        self.drain = drain
        self.write()

    def write(self, extra: str = "") -> None:
        self.config.write_text(
            BASE.format(drain=self.drain, repo=REPO, modules=self.tmp_path, ws_port=self.ws_port)
            + extra
        )

    def exit_code_within(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)


@pytest.fixture
def daemon(tmp_path: Path, notify: NotifySocket) -> Iterator[Daemon]:
    process = Daemon(tmp_path, notify)
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait()


async def test_second_stop_signal_exits_at_once_while_a_turn_hangs(daemon: Daemon) -> None:
    daemon.start()
    async with ws_connect(f"ws://127.0.0.1:{daemon.ws_port}/agents/hangs/a") as ws:
        await ws.send("hang")
        daemon.wait_log("turn is hanging now")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait_log("stopping: draining in-flight work")  # grace: 60 s
        daemon.send_signal(signal.SIGTERM)
        assert daemon.exit_code_within(10) == 128 + signal.SIGTERM
    log = daemon.log_text()
    assert "received SIGTERM again while stopping: exiting now with status 143" in log


async def test_first_stop_signal_still_drains_gracefully(daemon: Daemon) -> None:
    daemon.start()
    daemon.send_signal(signal.SIGINT)
    assert daemon.exit_code_within(30) == 0
    assert "received SIGINT: stopping gracefully (send it again to exit at once)" in (
        daemon.log_text()
    )


def test_signal_during_a_model_warm_up_that_never_ends_stops_start_up(
    daemon: Daemon, notify: NotifySocket
) -> None:
    build_spin(daemon.tmp_path / "endless.onnx", iterations=10**12)
    daemon.write('[models.endless]\npath = "endless.onnx"\nbuckets = [1]\n')
    daemon.start(wait_ready=False)
    notify.wait_for("STATUS", "starting", timeout_s=30)
    daemon.wait_log("engine: model 'endless': using CPUExecutionProvider", timeout_s=30)
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.exit_code_within(15) == 0
    assert time.monotonic() - started < 15
    assert not [m for _, m in notify.messages if m.get("READY") == "1"]
    assert "stop requested during start-up: abandoning start-up and stopping" in (daemon.log_text())


def test_reload_that_fails_to_import_an_agent_keeps_running_and_reports_ready(
    daemon: Daemon, notify: NotifySocket
) -> None:
    daemon.start()
    (daemon.tmp_path / "broken_agent.py").write_text("class Broken(\n")  # a SyntaxError
    daemon.write('[agents.classes.broken]\nclass = "broken_agent:Broken"\n')
    mark = len(notify.messages)
    daemon.send_signal(signal.SIGHUP)
    notify.wait_for("RELOADING", "1", after=mark)
    notify.wait_for("READY", "1", after=mark)
    daemon.wait_log("keeping the running configuration")
    why = next(line for line in daemon.log_text().splitlines() if "keeping the running" in line)
    assert "broken_agent" in why  # says which module could not be loaded

    # The reload loop survived: fixing the module and reloading again works.
    (daemon.tmp_path / "fixed_agent.py").write_text(
        "from gatewayd import Agent\n\nclass Fixed(Agent):\n    pass\n"
    )
    daemon.write('[agents.classes.fixed]\nclass = "fixed_agent:Fixed"\n')
    mark = len(notify.messages)
    daemon.send_signal(signal.SIGHUP)
    notify.wait_for("READY", "1", after=mark)
    daemon.wait_log("reload applied; these changes take effect after a restart")
    assert daemon.stop() == 0


async def test_one_drain_deadline_shared_by_transports_and_agents(
    tmp_path: Path, notify: NotifySocket, mosquitto: MosquittoBroker
) -> None:
    """MQTT waits for the hanging turn's ack, then the runtime drains the same turn: together
    they must take the grace period once, not twice."""
    daemon = Daemon(tmp_path, notify, drain="3s")
    daemon.write(
        f'[mqtt]\nenabled = true\nbroker_urls = ["{mosquitto.url}"]\nclient_id = "gw-drain"\n'
        '[[mqtt.routes]]\ntopic = "devices/{id}/telemetry"\nagent_class = "hangs"\n'
        'reply_topic = "devices/{id}/cmd"\n'
    )
    daemon.config.write_text(daemon.config.read_text().replace("[mqtt]\nenabled = false\n", ""))
    try:
        daemon.start()
        daemon.wait_log("mqtt: connected")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="dev-hang") as device:
            await device.publish("devices/d1/telemetry", b"hang", qos=1)
        daemon.wait_log("turn is hanging now")
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.exit_code_within(30) == 0
        elapsed = time.monotonic() - started
        assert 2.5 < elapsed < 5.0, f"stop took {elapsed:.1f}s for a 3 s grace period"
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
