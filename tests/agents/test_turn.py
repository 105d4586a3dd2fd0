"""The turn: every hook inside or after it is bounded by turn_timeout_s, and only the task
that runs a turn may use the agent's storage."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from gatewayd.agents import Agent, NotInTurnError, callable
from protocols.link import Outcome
from tests.agents.conftest import MemoryLink

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0  # far above turn_timeout_s below: reaching it means the agent is wedged


class HangingNotification(Agent):
    initial_state: ClassVar[dict] = {"n": 0}

    def on_message(self, conn, message):
        self.set_state({"n": self.state["n"] + 1})
        conn.send(f"n={self.state['n']}")

    async def on_state_changed(self, state, source):
        await asyncio.Event().wait()  # never returns


async def test_a_hanging_async_on_state_changed_is_cut_at_turn_timeout(make_runtime):
    async with make_runtime({"h": HangingNotification}, turn_timeout_s=0.2) as rt:
        link = MemoryLink("h", "1", transport="mqtt")
        await asyncio.wait_for(rt.open_link(link, {}), WAIT_S)
        outcome = await asyncio.wait_for(rt.submit_message(link, b"x"), WAIT_S)
        assert outcome is Outcome.APPLIED  # a notification undoes nothing: the change stands
        assert link.sent == ["n=1"]
        assert await asyncio.wait_for(rt.get_agent_state("h", "1"), WAIT_S) == {"n": 1}
        assert rt.stats()["turn_timeouts"] == 1
        assert await rt.drain(timeout_s=WAIT_S) is True


class HangingOnError(Agent):
    def on_message(self, conn, message):
        raise ValueError("this message fails")

    async def on_error(self, err):
        await asyncio.Event().wait()  # never returns

    @callable
    def ping(self):
        return "pong"


async def test_a_hanging_on_error_is_cut_at_turn_timeout(make_runtime):
    async with make_runtime({"e": HangingOnError}, turn_timeout_s=0.2) as rt:
        link = MemoryLink("e", "1", transport="mqtt")
        await asyncio.wait_for(rt.open_link(link, {}), WAIT_S)
        with pytest.raises(ValueError, match="this message fails"):
            await asyncio.wait_for(rt.submit_message(link, b"x"), WAIT_S)
        assert await asyncio.wait_for(rt.call("e", "1", "ping"), WAIT_S) == "pong"
        assert await rt.drain(timeout_s=WAIT_S) is True


class Spawner(Agent):
    """Starts a background task in one turn that writes while a later turn runs."""

    go: asyncio.Event
    outcome: asyncio.Future

    def on_start(self):
        self.sql("CREATE TABLE IF NOT EXISTS log (text TEXT)")

    @callable
    def spawn(self):
        async def later() -> None:
            await type(self).go.wait()
            try:
                self.sql("INSERT INTO log VALUES ('from the background task')")
            except Exception as err:
                type(self).outcome.set_result(err)
            else:
                type(self).outcome.set_result(None)

        asyncio.get_running_loop().create_task(later())

    @callable
    async def hold(self):
        self.sql("INSERT INTO log VALUES ('hold')")
        type(self).go.set()  # the background task now runs while this turn is open
        await type(self).outcome
        return "held"

    @callable
    async def gather_in_turn(self):
        async def write(text: str) -> None:
            await asyncio.sleep(0)
            self.sql("INSERT INTO log VALUES (?)", text)

        await asyncio.gather(write("child a"), write("child b"))

    @callable
    def log(self):
        return [row["text"] for row in self.sql("SELECT text FROM log ORDER BY rowid")]


async def test_a_task_started_in_an_earlier_turn_cannot_write_into_the_current_one(make_runtime):
    Spawner.go = asyncio.Event()
    Spawner.outcome = asyncio.get_running_loop().create_future()
    async with make_runtime({"s": Spawner}) as rt:
        await asyncio.wait_for(rt.call("s", "1", "spawn"), WAIT_S)
        assert await asyncio.wait_for(rt.call("s", "1", "hold"), WAIT_S) == "held"
        err = Spawner.outcome.result()
        assert isinstance(err, NotInTurnError)
        assert "does not run the current turn" in str(err)
        assert await rt.call("s", "1", "log") == ["hold"]


async def test_tasks_a_turn_starts_and_awaits_may_write_in_it(make_runtime):
    async with make_runtime({"s": Spawner}) as rt:
        await asyncio.wait_for(rt.call("s", "1", "gather_in_turn"), WAIT_S)
        assert await rt.call("s", "1", "log") == ["child a", "child b"]
