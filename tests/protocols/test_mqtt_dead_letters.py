"""Poison MQTT messages: bounded retries, then a durable dead letter and an ack; replay through
the broker. Against a real Mosquitto and real SQLite files."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocols.dead_letters import DeadLetterStore
from protocols.mqtt import MqttBridge
from protocols.mqtt_replay import replay_dead_letters
from tests.brokers import MosquittoBroker, free_port
from tests.protocols.mqtt_bridge_runner import SqliteLinkHandler, read_messages
from tests.protocols.test_mqtt import publish_all, settings_for
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("mqtt_client")


class Poison:
    """Fails every turn for the payload b"poison" while `active`; counts its attempts."""

    def __init__(self) -> None:
        self.active = True
        self.attempts = 0

    def __call__(self, data: bytes | str) -> bool:
        if data == b"poison" and self.active:
            self.attempts += 1
            return True
        return False


@pytest.fixture
def poison() -> Poison:
    return Poison()


@pytest.fixture
async def handler(tmp_path: Path, poison: Poison) -> AsyncIterator[SqliteLinkHandler]:
    handler = SqliteLinkHandler(tmp_path / "agents.sqlite", fail=poison)
    await handler.start()
    yield handler
    await handler.stop()


def payloads(db: Path) -> list[bytes]:
    return [payload for *_, payload in read_messages(db)]


async def test_poison_message_is_dead_lettered_after_max_attempts_then_acked(
    mosquitto: MosquittoBroker,
    handler: SqliteLinkHandler,
    poison: Poison,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "agents.sqlite"
    store = DeadLetterStore(tmp_path / "state" / "dead-letters.sqlite3")
    settings = settings_for(mosquitto, max_attempts=3)
    bridge = MqttBridge(settings, handler, dead_letters=store)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    caplog.set_level(logging.WARNING, logger="protocols.mqtt")
    before = time.time()
    await publish_all(
        mosquitto, [("devices/p-1/telemetry", b"poison"), ("devices/p-1/telemetry", b"fine")]
    )
    await wait_until(lambda: bridge.stats.extra.get("dead_lettered") == 1, 5, "the dead letter")
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the acks")
    assert payloads(db) == [b"fine"] and poison.attempts == 3
    extra = bridge.stats.extra
    assert extra["retries"] == 2 and extra["acked"] == 2

    [letter] = store.list()
    assert (letter.topic, letter.payload, letter.qos, letter.attempts) == (
        "devices/p-1/telemetry",
        b"poison",
        1,
        3,
    )
    assert "turn failed" in letter.error
    assert before <= letter.first_failed_at <= letter.last_failed_at
    [line] = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    for part in ("'devices/p-1/telemetry'", "'p-1'", "after 3 attempts", "turn failed", "#1"):
        assert part in line, (part, line)
    await bridge.stop()

    # It was acked: a bridge on the same session gets the next message, not the poison again.
    again = MqttBridge(settings, handler, dead_letters=store)
    await again.start()
    await again.wait_connected(timeout_s=5)
    await publish_all(mosquitto, [("devices/p-1/telemetry", b"next")])
    await wait_until(lambda: payloads(db) == [b"fine", b"next"], 5, "the next message")
    assert poison.attempts == 3

    # Replayed once the agent is fixed: republished to its topic, applied, row deleted.
    poison.active = False
    result = await replay_dead_letters(settings, store)
    assert result.replayed == [letter.id] and result.error is None and result.left == []
    await wait_until(lambda: b"poison" in payloads(db), 5, "the replayed message")
    assert store.list() == []
    await again.stop()


async def test_replay_keeps_rows_when_the_broker_is_unreachable(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    store = DeadLetterStore(tmp_path / "dead-letters.sqlite3")
    first, second = (
        store.add(
            topic=f"devices/{name}/telemetry",
            payload=name.encode(),
            qos=1,
            error="RuntimeError('boom')",
            attempts=5,
            first_failed_at=1.0,
            last_failed_at=2.0,
        )
        for name in ("a", "b")
    )
    down = settings_for(
        mosquitto, broker_urls=(f"mqtt://127.0.0.1:{free_port()}",), connect_timeout_s=1.0
    )
    result = await replay_dead_letters(down, store, [first, 99])
    assert result.replayed == [] and result.left == [first] and result.missing == [99]
    assert result.error is not None and "127.0.0.1" in result.error
    assert [letter.id for letter in store.list()] == [first, second]


async def test_a_dead_letter_that_cannot_be_written_is_not_acked_and_is_retried(
    mosquitto: MosquittoBroker, handler: SqliteLinkHandler, tmp_path: Path
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    store = DeadLetterStore(blocker / "dead-letters.sqlite3")
    bridge = MqttBridge(settings_for(mosquitto, max_attempts=2), handler, dead_letters=store)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    await publish_all(mosquitto, [("devices/p-2/telemetry", b"poison")])
    await wait_until(lambda: bridge.stats.extra.get("dead_letter_errors", 0) >= 1, 5, "an error")
    assert bridge.stats.extra["pending"] == 1 and bridge.stats.extra.get("acked", 0) == 0
    blocker.unlink()  # space again: the next attempts fail, and this time the row is written
    await wait_until(lambda: bridge.stats.extra.get("dead_lettered") == 1, 5, "the dead letter")
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the ack")
    assert [letter.payload for letter in store.list()] == [b"poison"]
    await bridge.stop()
