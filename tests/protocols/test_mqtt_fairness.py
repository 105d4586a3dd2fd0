"""One device's backlog cannot fill its agent's mailbox: at most `max_inflight_per_device` of a
device's messages are with the handler; the rest wait in the bridge, unacked, in arrival order.
Against a real Mosquitto, with the real SQLite-committing test handler (the gateway-level test,
a TCP device's ACK latency during an MQTT flood, is tests/gatewayd/test_fairness.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from protocols.link import DedupKey, Link, Outcome
from protocols.mqtt import MqttBridge, MqttConfigError, MqttSettings
from tests.brokers import MosquittoBroker
from tests.protocols.conftest import HandlerFactory
from tests.protocols.mqtt_bridge_runner import SqliteLinkHandler, read_messages
from tests.protocols.test_mqtt import THERMOSTAT, publish_all, settings_for
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("mqtt_client")


def stored(db: Path) -> list[tuple[str, bytes]]:
    return [(agent_id, payload) for _, agent_id, _, payload in read_messages(db)]


def test_the_window_must_be_positive() -> None:
    with pytest.raises(MqttConfigError, match="max_inflight_per_device"):
        MqttSettings(routes=(THERMOSTAT,), max_inflight_per_device=0)


class CountingHandler(SqliteLinkHandler):
    """Counts each device's messages between `submit_message` and their outcome (its share of
    the agent's mailbox). `gated`: nothing commits until `gate` is set."""

    def __init__(self, *args: Any, gated: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.in_mailbox: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.submitted = 0
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        device = link.route.agent_id
        self.submitted += 1
        self.in_mailbox[device] = self.in_mailbox.get(device, 0) + 1
        self.peak[device] = max(self.peak.get(device, 0), self.in_mailbox[device])
        future = super().submit_message(link, data, dedup)
        future.add_done_callback(lambda _: self._left(device))
        return future

    def _left(self, device: str) -> None:
        self.in_mailbox[device] -= 1

    async def _run(self) -> None:
        await self.gate.wait()
        await super()._run()


async def test_a_device_flood_keeps_at_most_its_window_in_the_mailbox(
    mosquitto: MosquittoBroker, handler_factory: HandlerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    failed_once: set[bytes] = set()

    def flaky(data: bytes | str) -> bool:  # 0050's first turn fails: its retry takes a place
        if data == b"0050" and data not in failed_once:
            failed_once.add(data)
            return True
        return False

    handler: CountingHandler = await handler_factory(
        CountingHandler, commit_delay_s=0.002, fail=flaky
    )
    settings = settings_for(mosquitto, max_pending_messages=64, max_inflight_per_device=4)
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    flood = [f"{n:04d}".encode() for n in range(300)]
    await publish_all(mosquitto, [("devices/flood/telemetry", p) for p in flood])
    await publish_all(mosquitto, [("devices/quiet/telemetry", b"q")])
    await wait_until(lambda: len(stored(db)) == 301, 20, "every message")
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the acks")

    assert handler.peak["flood"] == 4  # the window was full, and never exceeded
    assert handler.peak["quiet"] == 1
    rows = stored(db)
    assert sorted(p for i, p in rows if i == "flood") == flood  # once each
    # In arrival order, but for the retried message (it may come after later ones).
    assert [p for i, p in rows if i == "flood" and p != b"0050"] == [
        p for p in flood if p != b"0050"
    ]
    extra = bridge.stats.extra
    assert extra["acked"] == 301 and extra["retries"] == 1 and extra["held"] == 0
    assert extra["device_window_full"] > 0
    assert handler.submitted == 302  # each message once, plus the one retry
    await bridge.stop()


async def test_messages_beyond_the_window_wait_unacked_and_follow_in_order(
    mosquitto: MosquittoBroker, handler_factory: HandlerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler: CountingHandler = await handler_factory(CountingHandler, gated=True)
    bridge = MqttBridge(settings_for(mosquitto, max_inflight_per_device=2), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    busy = [f"busy-{n}".encode() for n in range(6)]
    await publish_all(mosquitto, [("devices/busy/telemetry", p) for p in busy])
    await wait_until(lambda: bridge.stats.extra["held"] == 4, 5, "4 messages beyond the window")
    extra = bridge.stats.extra
    assert extra["pending"] == 6 and extra.get("acked", 0) == 0
    assert handler.submitted == 2 and stored(db) == []

    handler.gate.set()
    await wait_until(lambda: len(stored(db)) == 6, 5, "the waiting messages")
    assert stored(db) == [("busy", p) for p in busy]  # once each, in arrival order
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the acks")
    assert bridge.stats.extra["acked"] == 6 and bridge.stats.extra["held"] == 0
    assert handler.peak["busy"] == 2
    await bridge.stop()
