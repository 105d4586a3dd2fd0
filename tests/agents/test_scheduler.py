"""The slot scheduler: FIFO per agent across destroy(), and bounded mailboxes."""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.agents import Agent, MailboxFullError, callable
from protocols.link import Outcome
from tests.agents.conftest import MemoryLink

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0


class Destructible(Agent):
    seen: list[tuple[int, str]] = []  # noqa: RUF012 - (instance, message) across instances
    starts = 0

    def on_start(self):
        type(self).starts += 1
        self.instance = type(self).starts
        self.sql("CREATE TABLE IF NOT EXISTS log (text TEXT)")

    @callable
    def note(self, text):
        type(self).seen.append((self.instance, text))
        self.sql("INSERT INTO log VALUES (?)", text)
        if text == "destroy":
            self.destroy()


async def test_events_behind_a_destroy_keep_their_order(make_runtime):
    Destructible.seen = []
    Destructible.starts = 0
    async with make_runtime({"d": Destructible}) as rt:
        destroyed = rt.submit_call("d", "1", "note", "destroy")
        queued = [rt.submit_call("d", "1", "note", f"queued {n}") for n in (1, 2)]
        # The destroy's turn has committed: the runtime is now tearing the agent down (its
        # database closing off the loop). An event arriving now must wait behind the queued ones.
        await asyncio.wait_for(destroyed, WAIT_S)
        late = rt.submit_call("d", "1", "note", "late")
        await asyncio.wait_for(asyncio.gather(*queued, late), WAIT_S)
        texts = [text for _instance, text in Destructible.seen]
        assert texts == ["destroy", "queued 1", "queued 2", "late"]
        assert [instance for instance, _text in Destructible.seen] == [1, 2, 2, 2]
        rows = await rt.run_in_agent(
            "d", "1", lambda agent: [r["text"] for r in agent.sql("SELECT text FROM log")]
        )
        assert rows == ["queued 1", "queued 2", "late"]  # the fresh agent's storage survived


class Gate(Agent):
    """Its `hold` call blocks the agent until the test releases it, so events pile up."""

    entered: asyncio.Event
    release: asyncio.Event
    seen: list[str] = []  # noqa: RUF012

    def on_message(self, conn, message):
        type(self).seen.append(message.decode())

    @callable
    async def hold(self):
        type(self).entered.set()
        await type(self).release.wait()

    @callable
    def ping(self):
        return "pong"


@pytest.fixture
def gate() -> type[Gate]:
    Gate.entered = asyncio.Event()
    Gate.release = asyncio.Event()
    Gate.seen = []
    return Gate


async def test_a_full_mailbox_answers_backpressure_and_opens_when_drained(make_runtime, gate):
    from protocols.link import Backpressure

    async with make_runtime({"g": gate}, max_mailbox_events=3) as rt:
        link = MemoryLink("g", "1", transport="mqtt")
        await asyncio.wait_for(rt.open_link(link, {}), WAIT_S)
        held = rt.submit_call("g", "1", "hold")
        await asyncio.wait_for(gate.entered.wait(), WAIT_S)
        accepted = [rt.submit_message(link, f"m{n}".encode()) for n in (1, 2, 3)]
        refused = rt.submit_message(link, b"m4")
        assert refused.done()
        with pytest.raises(Backpressure, match=r"mailbox full \(agents.max_mailbox_events=3\)"):
            refused.result()
        ready = refused.exception().ready
        other = MemoryLink("g", "1", transport="mqtt")
        opening = rt.open_link(other, {})
        with pytest.raises(Backpressure):
            opening.result()
        assert opening.exception().ready is ready  # one wait per full mailbox
        assert not ready.done()
        assert rt.stats()["events_queued"] == 3 and rt.stats()["mailbox_full_total"] == 2

        gate.release.set()
        await asyncio.wait_for(ready, WAIT_S)
        assert await asyncio.wait_for(rt.submit_message(link, b"m4"), WAIT_S) is Outcome.APPLIED
        await asyncio.wait_for(asyncio.gather(held, *accepted), WAIT_S)
        assert gate.seen == ["m1", "m2", "m3", "m4"]  # the refused event was never queued


async def test_a_full_mailbox_refuses_calls_with_mailbox_full_error(make_runtime, gate):
    async with make_runtime({"g": gate}, max_mailbox_events=2) as rt:
        held = rt.submit_call("g", "1", "hold")
        await asyncio.wait_for(gate.entered.wait(), WAIT_S)
        queued = [rt.submit_call("g", "1", "ping") for _ in range(2)]
        with pytest.raises(MailboxFullError, match="g/'1': mailbox full"):
            await rt.call("g", "1", "ping")
        assert await asyncio.wait_for(rt.call("g", "other", "ping"), WAIT_S) == "pong"
        gate.release.set()
        assert await asyncio.wait_for(asyncio.gather(*queued), WAIT_S) == ["pong", "pong"]
        await held


async def test_pending_calls_are_bounded_across_agents(make_runtime, gate):
    async with make_runtime({"g": gate}, max_pending_calls=2) as rt:
        held = rt.submit_call("g", "1", "hold")
        await asyncio.wait_for(gate.entered.wait(), WAIT_S)
        waiting = rt.submit_call("g", "2", "ping")
        with pytest.raises(MailboxFullError, match="max_pending_calls=2"):
            await rt.call("g", "3", "ping")
        gate.release.set()
        await asyncio.wait_for(asyncio.gather(held, waiting), WAIT_S)
        assert await asyncio.wait_for(rt.call("g", "3", "ping"), WAIT_S) == "pong"


async def test_drain_releases_transports_held_by_a_full_mailbox(make_runtime, gate):
    from protocols.link import Backpressure, LinkRejected

    async with make_runtime({"g": gate}, max_mailbox_events=1) as rt:
        link = MemoryLink("g", "1", transport="mqtt")
        await asyncio.wait_for(rt.open_link(link, {}), WAIT_S)
        held = rt.submit_call("g", "1", "hold")
        await asyncio.wait_for(gate.entered.wait(), WAIT_S)
        queued = rt.submit_message(link, b"m1")
        refused = rt.submit_message(link, b"m2")
        assert isinstance(refused.exception(), Backpressure)
        draining = asyncio.ensure_future(rt.drain(timeout_s=WAIT_S))
        await asyncio.wait_for(refused.exception().ready, WAIT_S)
        with pytest.raises(LinkRejected, match="shutting down"):
            await rt.submit_message(link, b"m2")
        gate.release.set()
        assert await asyncio.wait_for(draining, WAIT_S) is True
        await asyncio.wait_for(asyncio.gather(held, queued), WAIT_S)


def test_the_mailbox_limits_come_from_the_agents_config_section(tmp_path):
    from gatewayd.config import parse_config
    from gatewayd.wiring import agent_settings

    config = parse_config(
        {"agents": {"max_mailbox_events": 7, "max_pending_calls": 9}}, tmp_path / "gw.toml"
    )
    settings = agent_settings(config)
    assert (settings.max_mailbox_events, settings.max_pending_calls) == (7, 9)
