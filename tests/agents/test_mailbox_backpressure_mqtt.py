"""A full agent mailbox, end to end: MQTT devices -> real Mosquitto -> the MQTT bridge -> the
runtime with a tiny `max_mailbox_events`. The runtime answers Backpressure, the bridge holds
the messages unacknowledged and resubmits them: every message is applied once, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import pytest

from gatewayd import Agent, Connection
from gatewayd.agents import AgentRuntime
from gatewayd.config import parse_config
from gatewayd.wiring import agent_settings, build_transports
from protocols.mqtt import MqttBridge
from tests.brokers import MosquittoBroker
from tests.protocols.test_mqtt import publish_all
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

MESSAGES = 30


class Slow(Agent):
    """Holds its first turn until released, so the mailbox fills behind it."""

    release: ClassVar[asyncio.Event]
    all_seen: ClassVar[asyncio.Event]
    seen: ClassVar[list[int]] = []

    async def on_message(self, conn: Connection, message: bytes | str) -> None:
        await type(self).release.wait()
        type(self).seen.append(int(message))
        if len(type(self).seen) == MESSAGES:
            type(self).all_seen.set()


async def test_a_full_mailbox_holds_mqtt_messages_and_loses_none(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    Slow.release, Slow.all_seen, Slow.seen = asyncio.Event(), asyncio.Event(), []
    config = parse_config(
        {
            "gateway": {"state_dir": str(tmp_path / "state")},
            "agents": {
                "max_mailbox_events": 2,
                "classes": {"slow": {"class": f"{__name__}:Slow"}},
            },
            "mqtt": {
                "enabled": True,
                "broker_urls": [mosquitto.url],
                "client_id": "gw-backpressure",
                "routes": [
                    {
                        "topic": "devices/{id}/telemetry",
                        "agent_class": "slow",
                        "reply_topic": "devices/{id}/cmd",
                    }
                ],
            },
        },
        tmp_path / "gw.toml",
    )
    runtime = AgentRuntime(agent_settings(config), {"slow": Slow})
    await runtime.start()
    bridge = build_transports(config, runtime)["mqtt"]
    assert isinstance(bridge, MqttBridge)
    await bridge.start()
    try:
        await bridge.wait_connected(timeout_s=5)
        await publish_all(
            mosquitto, [("devices/d1/telemetry", str(n).encode()) for n in range(MESSAGES)]
        )
        await wait_until(lambda: runtime.stats()["mailbox_full_total"] > 0, 10, "a full mailbox")
        assert runtime.stats()["events_queued"] <= 2
        Slow.release.set()
        await asyncio.wait_for(Slow.all_seen.wait(), 20)
        assert Slow.seen == list(range(MESSAGES))
    finally:
        await bridge.stop()
        await runtime.close()
