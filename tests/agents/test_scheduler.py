"""The slot scheduler: FIFO per agent across destroy(), and bounded mailboxes."""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.agents import Agent, callable

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0


class Destructible(Agent):
    seen: list[tuple[int, str]] = []  # noqa: RUF012 - (instance, message) across instances

    def on_start(self):
        self.sql("CREATE TABLE IF NOT EXISTS log (text TEXT)")

    @callable
    def note(self, text):
        type(self).seen.append((id(self), text))
        self.sql("INSERT INTO log VALUES (?)", text)
        if text == "destroy":
            self.destroy()


async def test_events_behind_a_destroy_keep_their_order(make_runtime):
    Destructible.seen = []
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
        first, fresh = Destructible.seen[0][0], {instance for instance, _ in Destructible.seen[1:]}
        assert len(fresh) == 1 and first not in fresh  # one fresh agent took the rest
        rows = await rt.run_in_agent(
            "d", "1", lambda agent: [r["text"] for r in agent.sql("SELECT text FROM log")]
        )
        assert rows == ["queued 1", "queued 2", "late"]  # the fresh agent's storage survived
