"""An agent's own background tasks (`AgentHost.start_task`) and turns it queues from them
(`AgentHost.submit`): outside any turn, one per name, cancelled when the runtime closes."""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.agents import Agent, AgentError, NotInTurnError, callable

pytestmark = pytest.mark.timeout(30)


class Worker(Agent):
    started: asyncio.Event
    release: asyncio.Event
    outcome: list[str]

    def on_start(self):
        self.sql("CREATE TABLE IF NOT EXISTS log (text TEXT)")

    @callable
    def begin(self) -> str:
        host = self._gw_host
        cls = type(self)

        async def work() -> None:
            try:
                with pytest.raises(NotInTurnError):
                    self.sql("SELECT 1")  # the task belongs to no turn
                cls.started.set()
                await cls.release.wait()
                await host.submit(lambda agent: agent.sql("INSERT INTO log VALUES ('done')"))
                cls.outcome.append("finished")
            except asyncio.CancelledError:
                cls.outcome.append("cancelled")
                raise

        host.start_task("work", work())
        return "started"

    @callable
    def is_running(self) -> bool:
        return self._gw_host.running_task("work") is not None

    @callable
    def log(self) -> list[str]:
        return [row["text"] for row in self.sql("SELECT text FROM log")]


@pytest.fixture(autouse=True)
def fresh_events():
    Worker.started, Worker.release, Worker.outcome = asyncio.Event(), asyncio.Event(), []


async def test_a_task_runs_outside_turns_and_writes_through_submitted_turns(make_runtime):
    async with make_runtime({"w": Worker}) as rt:
        assert await rt.call("w", "1", "begin") == "started"
        await asyncio.wait_for(Worker.started.wait(), 10)
        assert await rt.call("w", "1", "is_running") is True
        with pytest.raises(AgentError, match="already running"):
            await rt.call("w", "1", "begin")
        Worker.release.set()
        assert await rt.call("w", "1", "log") in ([], ["done"])  # not yet, or already
        while not Worker.outcome:  # each call is a turn of the agent: no sleeping
            await rt.call("w", "1", "log")
        assert Worker.outcome == ["finished"]
        assert await rt.call("w", "1", "is_running") is False
        assert await rt.call("w", "1", "log") == ["done"]


async def test_running_tasks_are_cancelled_when_the_runtime_closes(make_runtime):
    async with make_runtime({"w": Worker}) as rt:
        await rt.call("w", "1", "begin")
        await asyncio.wait_for(Worker.started.wait(), 10)
    assert Worker.outcome == ["cancelled"]
