"""What MQTT publishers can make the gateway hold is bounded: allow-lists, the new-agent cap,
idle-link eviction, and an agent's full mailbox (Backpressure) held without acking or retrying.
Against a real Mosquitto, with the real SQLite-committing test handler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocols.link import Backpressure, DedupKey, Link, LinkRejected, Outcome
from protocols.mqtt import MqttBridge, MqttRoute
from protocols.mqtt_admission import IdAllowList, RouteAdmission, TokenBucket, Verdict
from tests.brokers import MosquittoBroker
from tests.protocols.conftest import HandlerFactory
from tests.protocols.mqtt_bridge_runner import SqliteLinkHandler, read_messages
from tests.protocols.test_mqtt import link_events, publish_all, settings_for
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("mqtt_client")


def stored(db: Path) -> list[tuple[str, bytes]]:
    return [(agent_id, payload) for _, agent_id, _, payload in read_messages(db)]


# ----------------------------------------------------------------- admission rules (pure)


def test_allow_list_takes_listed_ids_or_whole_pattern_matches() -> None:
    assert IdAllowList().allows("anything") and not IdAllowList().restricted
    both = IdAllowList(frozenset({"pump-1"}), r"th-\d{3}")
    assert both.allows("pump-1") and both.allows("th-007")
    for refused in ("pump-2", "th-7", "th-0071", "xth-007", ""):
        assert not both.allows(refused), refused
    assert not IdAllowList(frozenset()).allows("pump-1")  # an empty file allows nobody


def test_token_bucket_holds_one_minute_and_refills_evenly() -> None:
    bucket = TokenBucket(60, now=0.0)
    assert all(bucket.take(0.0) for _ in range(60))
    assert not bucket.take(0.0)
    assert not bucket.take(0.5)
    assert bucket.take(1.0)  # one per second at 60 per minute
    assert not bucket.take(1.0)
    assert sum(bucket.take(1000.0) for _ in range(100)) == 60  # never more than a minute's worth


def test_refusals_form_episodes_and_known_ids_are_never_capped() -> None:
    route = MqttRoute("d/{id}/t", "t", "d/{id}/c", max_new_agents_per_minute=2)
    admission = RouteAdmission(route, now=0.0)
    asked: list[str] = []

    def unknown(device_id: str) -> Callable[[], bool]:
        return lambda: asked.append(device_id) is not None  # records the question, says no

    assert admission.check("a", is_known=unknown("a"), now=0.0).verdict is Verdict.ADMIT
    assert admission.check("b", is_known=unknown("b"), now=0.0).verdict is Verdict.ADMIT
    first = admission.check("c", is_known=unknown("c"), now=0.0)
    assert first.verdict is Verdict.RATE_LIMITED and first.episode_started is not None
    second = admission.check("d", is_known=unknown("d"), now=1.0)
    assert second.verdict is Verdict.RATE_LIMITED and second.episode_started is None
    known = admission.check("old", is_known=lambda: True, now=1.0)
    assert known.verdict is Verdict.ADMIT and known.episode_ended is None
    later = admission.check("e", is_known=unknown("e"), now=31.0)  # one token back after 30 s
    assert later.verdict is Verdict.ADMIT
    assert later.episode_ended is not None and later.episode_ended.refused == 2
    assert later.episode_ended.first_id == "c"
    assert asked == ["a", "b", "c", "d", "e"]
    uncapped = RouteAdmission(
        MqttRoute("d/{id}/t", "t", "d/{id}/c", max_new_agents_per_minute=0), 0
    )
    never: Callable[[], bool] = lambda: pytest.fail("is_known asked without a cap")  # noqa: E731
    assert all(
        uncapped.check(str(n), is_known=never, now=0).verdict is Verdict.ADMIT for n in range(999)
    )


# ----------------------------------------------------------------- against a real broker


async def test_ids_outside_the_allow_list_are_acked_and_never_reach_an_agent(
    mosquitto: MosquittoBroker, handler_factory: HandlerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler = await handler_factory()
    route = MqttRoute(
        "devices/{id}/telemetry",
        "thermostat",
        "devices/{id}/cmd",
        allowed_ids=frozenset({"a", "b"}),
        allowed_id_pattern=r"th-\d+",
    )
    bridge = MqttBridge(settings_for(mosquitto, routes=(route,)), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    ids = ["a", "intruder", "b", "th-7", "th-7x", "th-", "a"]
    await publish_all(mosquitto, [(f"devices/{i}/telemetry", i.encode()) for i in ids])
    await wait_until(lambda: bridge.stats.extra.get("not_allowed") == 3, 5, "3 refusals")
    await wait_until(lambda: len(stored(db)) == 4, 5, "the 4 allowed messages")
    assert sorted(stored(db)) == sorted((i, i.encode()) for i in ["a", "b", "th-7", "a"])
    assert sorted(agent_id for _, agent_id, _ in link_events(db)) == ["a", "b", "th-7"]
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the allowed messages acked")
    assert bridge.stats.links_open == 3
    await bridge.stop()


async def test_new_agents_per_minute_are_capped_with_one_log_line_per_episode(
    mosquitto: MosquittoBroker,
    handler_factory: HandlerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "agents.sqlite"
    handler = await handler_factory()
    route = MqttRoute(
        "devices/{id}/telemetry", "thermostat", "devices/{id}/cmd", max_new_agents_per_minute=3
    )
    asked: list[tuple[str, str]] = []

    def known_agent(agent_class: str, agent_id: str) -> bool:
        asked.append((agent_class, agent_id))
        return agent_id.startswith("known-")

    bridge = MqttBridge(settings_for(mosquitto, routes=(route,)), handler, known_agent=known_agent)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    caplog.set_level(logging.WARNING, logger="protocols.mqtt")
    items = [(f"devices/new-{n}/telemetry", f"new-{n}".encode()) for n in range(10)]
    items += [(f"devices/known-{n}/telemetry", f"known-{n}".encode()) for n in range(5)]
    items += [("devices/new-0/telemetry", b"new-0 again")]  # admitted ids keep their link
    await publish_all(mosquitto, items)
    await wait_until(lambda: bridge.stats.extra.get("new_agent_refused") == 7, 5, "7 refusals")
    await wait_until(lambda: len(stored(db)) == 3 + 5 + 1, 5, "the admitted messages")
    assert sorted(p for _, p in stored(db)) == sorted(
        [b"new-0", b"new-1", b"new-2", b"new-0 again"] + [f"known-{n}".encode() for n in range(5)]
    )
    # The rows are visible once committed; the bridge counts a message done (acked) when the
    # commit's future resolves on its loop, a moment later.
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the admitted messages acked")
    assert bridge.stats.links_open == 3 + 5
    assert ("thermostat", "known-0") in asked
    episode_lines = [r for r in caplog.records if "max_new_agents_per_minute=3" in r.getMessage()]
    assert len(episode_lines) == 1, [r.getMessage() for r in episode_lines]
    message = episode_lines[0].getMessage()
    assert "devices/{id}/telemetry" in message and "'new-3'" in message
    await bridge.stop()


async def test_idle_links_are_closed_and_reopened_by_the_next_message(
    mosquitto: MosquittoBroker, handler_factory: HandlerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    close_gate = asyncio.Event()
    handler = await handler_factory(strict_links=True, close_gate=close_gate)
    bridge = MqttBridge(settings_for(mosquitto, link_idle_timeout_s=0.2), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    await publish_all(mosquitto, [(f"devices/d{n}/telemetry", b"1") for n in range(3)])
    await wait_until(lambda: len(stored(db)) == 3, 5, "the first messages")
    await wait_until(lambda: bridge.stats.extra.get("links_evicted") == 3, 5, "3 evictions")
    assert bridge.stats.links_open == 0

    # The close of d0 has not committed yet (the runtime still holds its link id): the next
    # message from d0 waits for it, unacked, instead of being refused as a duplicate link.
    await publish_all(mosquitto, [("devices/d0/telemetry", b"2")])
    await wait_until(lambda: bridge.stats.extra["held"] == 1, 5, "the message to wait")
    close_gate.set()
    await wait_until(lambda: ("d0", b"2") in stored(db), 5, "the message after the close")
    events = [(e, ctx) for e, agent_id, ctx in link_events(db) if agent_id == "d0"]
    assert [e for e, _ in events] == ["open", "close", "open"]
    assert events[1][1] == "1000 no message for 0.2s"
    closes = [agent_id for e, agent_id, _ in link_events(db) if e == "close"]
    assert sorted(closes) == ["d0", "d1", "d2"]
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the ack")
    assert bridge.stats.extra.get("rejected", 0) == 0
    await bridge.stop()


class FullMailboxHandler(SqliteLinkHandler):
    """Answers `Backpressure` for devices in `full` until their `ready` future resolves,
    raised (`form="raise"`) or as an already failed future (`form="future"`)."""

    def __init__(self, *args: Any, form: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.form = form
        self.full: dict[str, asyncio.Future[None]] = {}
        self.refusals = 0

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        ready = self.full.get(link.route.agent_id)
        if ready is None or ready.done():
            return super().submit_message(link, data, dedup)
        self.refusals += 1
        refusal = Backpressure("mailbox full", ready)
        if self.form == "raise":
            raise refusal
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        future.set_exception(refusal)
        return future


@pytest.mark.parametrize("form", ["raise", "future"])
async def test_full_mailbox_holds_messages_unacked_in_order_without_counting_attempts(
    mosquitto: MosquittoBroker, handler_factory: HandlerFactory, tmp_path: Path, form: str
) -> None:
    db = tmp_path / "agents.sqlite"
    handler: FullMailboxHandler = await handler_factory(FullMailboxHandler, form=form)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handler.full["busy"] = ready
    # max_attempts=1: were a refusal counted as a failed turn, the message would be given up.
    settings = settings_for(mosquitto, max_attempts=1, link_idle_timeout_s=0.1)
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    busy = [f"busy-{n}".encode() for n in range(5)]
    await publish_all(mosquitto, [("devices/busy/telemetry", p) for p in busy])
    await publish_all(mosquitto, [("devices/free/telemetry", b"free")])
    await wait_until(lambda: stored(db) == [("free", b"free")], 5, "the other device's message")
    await wait_until(lambda: bridge.stats.extra["held"] == 5, 5, "5 held messages")
    # A sweep closed the idle free link; the busy one holds messages and stays open.
    await wait_until(lambda: bridge.stats.extra.get("links_evicted") == 1, 5, "the free link")
    extra = bridge.stats.extra
    assert extra["pending"] == 5 and extra["acked"] == 1 and extra["backpressure"] >= 1
    assert handler.refusals == extra["backpressure"]  # one try per wake-up, not per message
    assert stored(db) == [("free", b"free")]

    ready.set_result(None)
    await wait_until(lambda: len(stored(db)) == 6, 5, "the held messages")
    assert [p for i, p in stored(db) if i == "busy"] == busy  # in arrival order
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the acks")
    extra = bridge.stats.extra
    assert extra["acked"] == 6 and extra["held"] == 0
    assert extra.get("retries", 0) == 0 and extra.get("dead_letters_dropped", 0) == 0
    # Held, the busy link was never closed (it may be now that it is idle, but not reopened).
    assert [e for e, i, _ in link_events(db) if i == "busy"].count("open") == 1
    await bridge.stop()


async def test_held_messages_give_back_their_slots_when_the_connection_drops(
    mosquitto: MosquittoBroker, handler_factory: HandlerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler: FullMailboxHandler = await handler_factory(FullMailboxHandler, form="raise")
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handler.full["busy"] = ready
    bridge = MqttBridge(settings_for(mosquitto), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    busy = [f"busy-{n}".encode() for n in range(3)]
    await publish_all(mosquitto, [("devices/busy/telemetry", p) for p in busy])
    await wait_until(lambda: bridge.stats.extra["held"] == 3, 5, "3 held messages")

    mosquitto.restart()  # the unacked messages stay in the session and come again
    await wait_until(lambda: bridge.stats.extra.get("connects") == 2, 10, "the reconnect")
    await wait_until(
        lambda: bridge.stats.extra.get("failed_left_for_redelivery") == 3, 5, "the release"
    )
    await wait_until(lambda: bridge.stats.extra["held"] == 3, 5, "the redelivered messages")
    assert bridge.stats.extra["pending"] == 3  # not 6: the old connection's copies are gone

    ready.set_result(None)
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the acks")
    assert stored(db) == [("busy", p) for p in busy]  # once each, in order
    await bridge.stop()


class ShuttingDownHandler(FullMailboxHandler):
    """Once `ready` resolved, refuses like a runtime that is shutting down (code 1001)."""

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        ready = self.full.get(link.route.agent_id)
        if ready is not None and ready.done():
            future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            future.set_exception(LinkRejected("shutting down", code=1001))
            return future
        return super().submit_message(link, data, dedup)


async def test_a_held_message_refused_by_a_shutdown_is_left_for_redelivery_not_acked(
    mosquitto: MosquittoBroker, handler_factory: HandlerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler: ShuttingDownHandler = await handler_factory(ShuttingDownHandler, form="raise")
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handler.full["busy"] = ready
    settings = settings_for(mosquitto)
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    await publish_all(mosquitto, [("devices/busy/telemetry", b"keep me")])
    await wait_until(lambda: bridge.stats.extra["held"] == 1, 5, "the held message")
    ready.set_result(None)  # the handler shuts down: `ready` resolves, the retry is refused
    await wait_until(
        lambda: bridge.stats.extra.get("failed_left_for_redelivery") == 1, 5, "the release"
    )
    assert bridge.stats.extra.get("acked", 0) == 0 and bridge.stats.rejected == 0
    await bridge.stop()

    # Not acked: the next gateway gets it from the broker.
    again = MqttBridge(settings, await handler_factory())
    await again.start()
    await again.wait_connected(timeout_s=5)
    await wait_until(lambda: stored(db) == [("busy", b"keep me")], 5, "the redelivery")
    await again.stop()
