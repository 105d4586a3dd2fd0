"""One link must not monopolise an agent: an MQTT backlog flood and a TCP device share an agent.

The whole gateway runs as a subprocess with a real Mosquitto and a real binary-frame device.
The broker holds a backlog of QoS 1 messages for the gateway's persistent session; while the
gateway drains it into the agent, the TCP device's frames to the *same* agent must still be
acknowledged promptly (the MQTT bridge keeps at most `[mqtt] max_inflight_per_device` of one
device's messages in the agent's mailbox), and every MQTT message is applied exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import ConfigError, parse_config
from gatewayd.wiring import mqtt_settings
from tests.brokers import MosquittoBroker
from tests.gatewayd.fairness_site import FairnessSite
from tests.gatewayd.notify import NotifySocket

# MQTT messages for one agent, each a ~2 ms turn ("slow:"): a ~3-4 s drain. Before the window,
# the agent's mailbox held ~1,000 of them ahead of each TCP frame: ACK p99 1.9-2.8 s.
BACKLOG = 1500
ACK_P99_BOUND_S = 1.0


@pytest.fixture
def site(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[FairnessSite]:
    notify = NotifySocket(tmp_path)
    site = FairnessSite(tmp_path, mosquitto, notify)
    try:
        yield site
    finally:
        try:
            site.process.stop()
        finally:
            notify.close()


async def test_tcp_frames_are_acked_promptly_while_an_mqtt_backlog_drains(
    site: FairnessSite,
) -> None:
    backlog = [f"slow:{i}".encode() for i in range(BACKLOG)]
    await site.queue_backlog(backlog)
    drain = await site.drain_with_tcp_probe(BACKLOG)
    assert site.process.stop() == 0

    rows = site.rows()
    assert [b for t, b in rows if t == "mqtt"] == backlog  # each once, in order
    assert [b for t, b in rows if t == "tcp"] == [
        f"tcp-{s}".encode() for s in range(1, drain.frames + 1)
    ]
    assert drain.frames >= 3, f"too few TCP frames during the drain: {drain.latencies}"
    print(
        f"fairness: {drain.frames} TCP frames, ACK p50 {drain.p50:.3f}s p99 {drain.p99:.3f}s "
        f"max {max(drain.latencies):.3f}s, drain {drain.drain_s:.2f}s"
    )
    assert drain.p99 < ACK_P99_BOUND_S, (
        f"TCP ACK p99 {drain.p99:.3f}s (max {max(drain.latencies):.3f}s, {drain.frames} "
        f"frames) while an MQTT backlog of {BACKLOG} drained into the same agent"
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
