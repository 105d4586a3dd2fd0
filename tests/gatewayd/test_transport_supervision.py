"""The MQTT bridge's background loops (connection, replies' connection, idle-link eviction;
replies are published without loops of their own) run under the gateway's transport
supervisor, through the `spawn_loop` hook of protocols/tasks.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.config import load_config
from gatewayd.wiring import Components
from tests.brokers import MosquittoBroker

pytestmark = pytest.mark.timeout(60)


async def test_mqtt_loops_are_started_by_the_transport_supervisor(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    config_file = tmp_path / "gatewayd.toml"
    config_file.write_text(
        '[gateway]\nstate_dir = "state"\n[listeners.websocket]\nenabled = false\n'
        '[agents.classes.echo]\nclass = "gatewayd.examples.thermostat:Thermostat"\n'
        f'[mqtt]\nenabled = true\nbroker_urls = ["{mosquitto.url}"]\n'
        "max_inflight_publishes = 3\n"
        '[[mqtt.routes]]\ntopic = "devices/{id}/telemetry"\nagent_class = "echo"\n'
        'reply_topic = "devices/{id}/cmd"\n'
    )
    components = Components(load_config(config_file), config_file)
    await components.start()
    try:
        await components.transports["mqtt"].wait_connected(timeout_s=10)
        assert set(components.supervisor.restarts) == {
            "mqtt-connection",
            "mqtt-outbound-connection",  # the replies' own connection (protocols/mqtt.py)
            "mqtt-idle",
        }
        assert components.health() == (True, "ok")
    finally:
        await components.stop(5)
    assert components.supervisor.failing() == {}
