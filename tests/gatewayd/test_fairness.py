"""One link must not monopolise an agent: an MQTT backlog flood and a TCP device share an agent.

The whole gateway runs as a subprocess with a real Mosquitto and a real binary-frame device.
The broker holds a backlog of QoS 1 messages for the gateway's persistent session; while the
gateway drains it into the agent, the TCP device's frames to the *same* agent must still be
acknowledged promptly (the MQTT bridge keeps at most `[mqtt] max_inflight_per_device` of one
device's messages in the agent's mailbox), and every MQTT message is applied exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.agents.storage import agent_db_path
from gatewayd.config import ConfigError, parse_config
from gatewayd.wiring import mqtt_settings
from protocols.frames import Ack, Data, encode
from protocols.mqttwire.aio import MqttClient
from protocols.mqttwire.connection import ConnectOptions
from tests.brokers import MosquittoBroker, free_port
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.devices import TcpDevice
from tests.gatewayd.notify import NotifySocket
from tests.waiting import wait_until

CONFIG = """
[gateway]
state_dir = "state"
drain_timeout = "5s"
[http]
bind = "127.0.0.1:0"
[agents]
python_path = ["{repo}"]
[agents.classes.recorder]
class = "tests.gatewayd.e2e_agents:Recorder"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
[listeners.binary]
enabled = true
bind = "127.0.0.1:{tcp_port}"
agent_class = "recorder"
secrets_file = "devices.toml"
[mqtt]
enabled = true
broker_urls = ["{broker_url}"]
client_id = "gw-fair"
reconnect_max = "1s"
[[mqtt.routes]]
topic = "devices/{{id}}/telemetry"
agent_class = "recorder"
reply_topic = "devices/{{id}}/cmd"
"""

BACKLOG = 1500  # MQTT messages for one agent, each a ~2 ms turn ("slow:"): a ~4 s drain
ACK_P99_BOUND_S = 1.0


class Gateway:
    def __init__(self, tmp_path: Path, broker: MosquittoBroker, notify: NotifySocket) -> None:
        self.tcp_port = free_port()
        (tmp_path / "devices.toml").write_text('"dev-1" = "s1"\n')
        (tmp_path / "devices.toml").chmod(0o600)
        config = tmp_path / "gatewayd.toml"
        config.write_text(
            CONFIG.format(
                repo=REPO, ws_port=free_port(), tcp_port=self.tcp_port, broker_url=broker.url
            )
        )
        self.state_dir = tmp_path / "state"
        self.process = GatewayProcess(config, notify)

    def rows(self, agent_id: str) -> list[tuple[str, bytes]]:
        """What the agent committed, read straight from its SQLite file."""
        path = agent_db_path(self.state_dir, "recorder", agent_id)
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone():
                return []
            return [
                (t, bytes(b))
                for t, b in db.execute("SELECT transport, body FROM messages ORDER BY n")
            ]


@pytest.fixture
def gateway(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[Gateway]:
    notify = NotifySocket(tmp_path)
    gateway = Gateway(tmp_path, mosquitto, notify)
    try:
        yield gateway
    finally:
        try:
            gateway.process.stop()
        finally:
            notify.close()


async def _publish_backlog(broker: MosquittoBroker, count: int) -> None:
    """`count` QoS 1 messages for dev-1, pipelined (the broker queues them for the gateway)."""
    publisher = MqttClient(broker.host, broker.port, ConnectOptions("flood", max_inflight=200))
    async with publisher:
        for start in range(0, count, 200):
            await asyncio.gather(
                *(
                    publisher.publish("devices/dev-1/telemetry", f"slow:{i}".encode(), qos=1)
                    for i in range(start, min(count, start + 200))
                )
            )


async def test_tcp_frames_are_acked_promptly_while_an_mqtt_backlog_drains(
    gateway: Gateway, mosquitto: MosquittoBroker
) -> None:
    gateway.process.start()
    gateway.process.wait_log("mqtt: connected")
    gateway.process.stop()  # the broker now holds the gateway's persistent session
    await _publish_backlog(mosquitto, BACKLOG)

    def mqtt_applied() -> int:
        return sum(1 for t, _ in gateway.rows("dev-1") if t == "mqtt")

    gateway.process.start()
    started_at = time.monotonic()
    device = TcpDevice(gateway.tcp_port, "dev-1", "s1")
    await device.connect()
    latencies: list[float] = []
    seq = 0
    drained_while_sending = False
    deadline = time.monotonic() + 30
    # One frame at a time, the next once the last one is acked, until the backlog is gone.
    while time.monotonic() < deadline:
        drained = mqtt_applied() >= BACKLOG
        if drained:
            drained_while_sending = True
            break
        seq += 1
        sent_at = time.monotonic()
        device.writer.write(encode(Data(seq, f"tcp-{seq}".encode())))
        while Ack(seq) not in device.received:
            await device.next_frame()
        latencies.append(time.monotonic() - sent_at)
    drain_s = time.monotonic() - started_at
    assert drained_while_sending, f"the MQTT backlog did not drain ({mqtt_applied()} applied)"
    await wait_until(lambda: mqtt_applied() >= BACKLOG, 30, "every MQTT message applied")
    assert gateway.process.stop() == 0

    rows = gateway.rows("dev-1")
    mqtt_bodies = [b for t, b in rows if t == "mqtt"]
    assert sorted(mqtt_bodies) == sorted(f"slow:{i}".encode() for i in range(BACKLOG))
    assert mqtt_bodies == [f"slow:{i}".encode() for i in range(BACKLOG)], "per-device order"
    assert [b for t, b in rows if t == "tcp"] == [f"tcp-{s}".encode() for s in range(1, seq + 1)]
    assert len(latencies) >= 3, f"too few TCP frames during the drain: {latencies}"
    p99 = (
        statistics.quantiles(latencies, n=100, method="inclusive")[98]
        if len(latencies) > 1
        else latencies[0]
    )
    print(
        f"fairness: {len(latencies)} TCP frames, ACK p50 {statistics.median(latencies):.3f}s "
        f"p99 {p99:.3f}s max {max(latencies):.3f}s, drain {drain_s:.2f}s"
    )
    assert p99 < ACK_P99_BOUND_S, (
        f"TCP ACK p99 {p99:.3f}s (max {max(latencies):.3f}s, {len(latencies)} frames) while "
        f"an MQTT backlog of {BACKLOG} drained into the same agent"
    )


def _config(tmp_path: Path, **mqtt: Any) -> dict[str, Any]:
    route = {"topic": "devices/{id}/telemetry", "agent_class": "t", "reply_topic": "d/{id}/cmd"}
    return {
        "gateway": {"state_dir": str(tmp_path)},
        "agents": {"classes": {"t": {"class": "gatewayd.examples.thermostat:Thermostat"}}},
        "mqtt": {"enabled": True, "routes": [route], **mqtt},
    }


def test_the_window_setting_is_read_from_the_config_and_checked(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path, max_inflight_per_device=8), tmp_path / "gw.toml")
    assert mqtt_settings(config.mqtt).max_inflight_per_device == 8
    default = parse_config(_config(tmp_path), tmp_path / "gw.toml")
    assert mqtt_settings(default.mqtt).max_inflight_per_device == 32
    with pytest.raises(ConfigError, match="max_inflight_per_device"):
        parse_config(_config(tmp_path, max_inflight_per_device=0), tmp_path / "gw.toml")
