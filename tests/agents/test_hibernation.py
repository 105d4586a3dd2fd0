"""Hibernation: idle eviction, LRU cap, wake, and what survives with the connection."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from gatewayd.agents import Agent, callable
from tests.agents.conftest import MemoryLink
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class Sleepy(Agent):
    initial_state: ClassVar[dict] = {"n": 0}
    starts: int = 0

    def on_start(self):
        type(self).starts += 1

    def on_connect(self, conn, ctx):
        conn.set_state({"joined": ctx.get("who")})

    def on_message(self, conn, message):
        self.set_state({"n": self.state["n"] + 1})
        conn.send(f"{conn.state['joined']}:{self.state['n']}")

    def should_send_protocol_messages(self, conn, ctx):
        return ctx.get("who") != "device"

    def get_connection_tags(self, conn, ctx):
        return [ctx["who"]]

    @callable
    def tags(self):
        return {c.state["joined"]: list(c.tags) for c in self.get_connections()}


async def test_idle_agent_hibernates_and_wakes_with_connections_intact(make_runtime):
    Sleepy.starts = 0
    async with make_runtime({"s": Sleepy}, hibernate_after_s=0.2) as rt:
        dashboard = MemoryLink("s", "x", transport="ws")
        device = MemoryLink("s", "x", transport="ws")
        await rt.open_link(dashboard, {"who": "dash"})
        await rt.open_link(device, {"who": "device"})
        await rt.submit_message(device, b"\x01")
        assert rt.is_awake("s", "x")
        await wait_until(lambda: not rt.is_awake("s", "x"), 10, "the idle agent to hibernate")
        stats = rt.stats()
        assert stats["active_agents"] == 0 and stats["hibernations_total"] == 1
        assert stats["connections_open"] == 2
        await rt.submit_message(device, b"\x02")  # wakes it
        assert Sleepy.starts == 2
        assert device.plain() == ["device:1", "device:2"]  # per-connection state survived
        assert device.frames() == []  # suppression flag survived hibernation
        assert [f["state"] for f in dashboard.frames("gw.state")] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert await rt.call("s", "x", "tags") == {"dash": ["dash"], "device": ["device"]}


async def test_lru_cap_on_active_agents(make_runtime):
    async with make_runtime({"s": Sleepy}, max_active_agents=3) as rt:
        for i in range(10):
            await rt.call("s", f"a{i}", "tags")
        assert rt.stats()["active_agents"] <= 3
        assert rt.is_awake("s", "a9") and not rt.is_awake("s", "a0")
        assert rt.stats()["hibernations_total"] >= 7


async def test_hibernated_agents_hold_no_memory_in_the_runtime(make_runtime):
    async with make_runtime({"s": Sleepy}) as rt:
        await asyncio.gather(*(rt.call("s", f"a{i}", "tags") for i in range(200)))
        assert rt.hibernate_idle() == 200
        await wait_until(lambda: rt._scheduler.slots == {}, 5, "every slot to be released")
        assert rt.stats()["active_agents"] == 0
        assert await rt.call("s", "a7", "tags") == {}
