"""Schedules, queue and retry through the runtime: hibernated agents, restarts, failures."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from gatewayd.agents import Agent, callable
from gatewayd.agents.errors import QueueItemFailedError, ScheduleFailedError
from gatewayd.agents.storage import agent_db_path
from tests.agents.conftest import MemoryLink
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class Planner(Agent):
    initial_state: ClassVar[dict] = {"ticks": [], "done": []}
    errors: ClassVar[list] = []
    flaky_calls: ClassVar[int] = 0

    def on_start(self):
        self.schedule_every(3600, "hourly")  # registered on every wake: idempotent

    def on_error(self, err):
        type(self).errors.append(err)

    def hourly(self, payload):
        pass

    def tick(self, payload):
        self.set_state({**self.state, "ticks": [*self.state["ticks"], payload]})

    def work(self, payload):
        if payload == "poison":
            raise RuntimeError("poisoned item")
        self.set_state({**self.state, "done": [*self.state["done"], payload]})

    def always_fails(self, payload):
        self.sql("CREATE TABLE IF NOT EXISTS junk (x)")
        raise ValueError("cannot do it")

    @callable
    def plan(self, delay_s, payload):
        return self.schedule(delay_s, "tick", payload).id

    @callable
    def plan_failing(self):
        return self.schedule(
            0,
            "always_fails",
            None,
            retry={"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.02},
        ).id

    @callable
    def enqueue(self, *payloads):
        return [
            self.queue(
                "work", p, retry={"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.02}
            ).id
            for p in payloads
        ]

    @callable
    def schedules(self):
        return sorted(s.method for s in self.get_schedules())

    @callable
    def queue_items(self):
        return [(q.method, q.payload, q.status) for q in self.get_queues(status=None)]

    @callable
    async def flaky(self):
        def attempt():
            type(self).flaky_calls += 1
            if type(self).flaky_calls < 3:
                raise OSError("sensor busy")
            return "read"

        return await self.retry(attempt, max_attempts=3, base_delay=0.01, max_delay=0.02)

    @callable
    def bad_schedule(self):
        self.schedule(1, "nope")

    @callable
    def goodbye(self):
        self.destroy()


@pytest.fixture(autouse=True)
def _reset():
    Planner.errors = []
    Planner.flaky_calls = 0


async def wait_for(predicate, timeout_s=5.0):
    for _ in range(int(timeout_s / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_schedule_fires_for_a_hibernated_agent(make_runtime):
    async with make_runtime({"p": Planner}, hibernate_after_s=0.05) as rt:
        await rt.call("p", "a", "plan", 0.5, "later")
        await wait_for(lambda: _async(not rt.is_awake("p", "a")))
        await wait_for(lambda: _state_has(rt, "a", "ticks", "later"))
        assert await rt.call("p", "a", "schedules") == ["hourly"]  # one-shot gone, interval once


async def test_overdue_schedule_runs_after_restart_without_any_event(make_runtime):
    async with make_runtime({"p": Planner}) as rt:
        await rt.call("p", "r", "plan", 0.3, "overdue")
    await asyncio.sleep(0.4)
    async with make_runtime({"p": Planner}) as rt:
        await wait_for(lambda: _async(rt.stats()["wakes_total"] >= 1))
        await wait_for(lambda: _state_has(rt, "r", "ticks", "overdue"))


async def test_registration_in_on_start_is_idempotent(make_runtime):
    async with make_runtime({"p": Planner}) as rt:
        for _ in range(3):
            await rt.call("p", "i", "schedules")
            # Idle only once its turn has fully ended: ask until it goes (it used to be asked
            # once, too early, and the agent never hibernated: on_start never ran again).
            await wait_until(lambda: rt.hibernate_idle() == 1, 5, "the agent to hibernate")
        assert rt.stats()["hibernations_total"] == 3
        assert await rt.call("p", "i", "schedules") == ["hourly"]
        with pytest.raises(Exception, match="no method 'nope'"):
            await rt.call("p", "i", "bad_schedule")


async def test_failing_schedule_is_retried_then_reported(make_runtime):
    async with make_runtime({"p": Planner}) as rt:
        await rt.call("p", "f", "plan_failing")
        await wait_for(lambda: _async(bool(Planner.errors)))
        assert isinstance(Planner.errors[0], ScheduleFailedError)
        assert "failed 2 times" in str(Planner.errors[0]) and "cannot do it" in str(
            Planner.errors[0]
        )
        assert await rt.call("p", "f", "schedules") == ["hourly"]
        tables = await rt.run_in_agent(
            "p", "f", lambda a: a.sql("SELECT name FROM sqlite_master WHERE name = 'junk'")
        )
        assert tables == []  # every failed run was rolled back
        failures = await rt.run_in_agent(
            "p", "f", lambda a: a.sql("SELECT method, attempts FROM _gw_schedule_failures")
        )
        assert failures == [{"method": "always_fails", "attempts": 2}]


async def test_queue_drains_on_enqueue_in_order_and_dead_letters_poison(make_runtime):
    async with make_runtime({"p": Planner}) as rt:
        await rt.call("p", "q", "enqueue", "a", "poison", "b")
        await wait_for(lambda: _async(bool(Planner.errors)))
        assert (await rt.get_agent_state("p", "q"))["done"] == ["a", "b"]
        assert isinstance(Planner.errors[0], QueueItemFailedError)
        assert await rt.call("p", "q", "queue_items") == [("work", "poison", "dead")]


async def test_queue_items_left_at_shutdown_run_after_restart(make_runtime, tmp_path):
    async with make_runtime({"p": Planner}) as rt:
        link = MemoryLink("p", "w")
        await rt.open_link(link, {})
        # Stop accepting right after the enqueueing turn commits: the drain alarm is refused.
        future = rt.submit_call("p", "w", "enqueue", "x", "y")
        rt._accepting = False
        await future
        assert await _queue_rows(tmp_path, "w") == 2
        rt._accepting = True
    async with make_runtime({"p": Planner}) as rt:
        await wait_for(lambda: _state_has(rt, "w", "done", "y"))
        assert (await rt.get_agent_state("p", "w"))["done"] == ["x", "y"]


async def test_retry_backs_off_until_success(make_runtime):
    async with make_runtime({"p": Planner}) as rt:
        assert await rt.call("p", "t", "flaky") == "read"
        assert Planner.flaky_calls == 3


async def test_destroy_deletes_storage_schedules_and_connections(make_runtime, tmp_path):
    async with make_runtime({"p": Planner}) as rt:
        link = MemoryLink("p", "gone")
        await rt.open_link(link, {})
        await rt.call("p", "gone", "plan", 60, "never")
        path = agent_db_path(tmp_path / "state", "p", "gone")
        assert path.exists() and await rt._index.get("p", "gone") is not None
        await rt.call("p", "gone", "goodbye")
        await wait_for(lambda: _async(not path.exists()))
        assert link.closed == (1000, "agent destroyed")
        assert await rt._index.get("p", "gone") is None
        assert await rt.call("p", "gone", "schedules") == ["hourly"]  # a fresh agent


async def _async(value):
    return value


async def _state_has(rt, agent_id, key, value):
    return value in (await rt.get_agent_state("p", agent_id))[key]


async def _queue_rows(tmp_path, agent_id):
    import sqlite3

    with sqlite3.connect(agent_db_path(tmp_path / "state", "p", agent_id)) as db:
        return db.execute("SELECT count(*) FROM _gw_queue").fetchone()[0]
