"""AgentRuntime.close(): every agent database and the executor are closed, whatever failed."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from gatewayd.agents import Agent, callable

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0


class Keeper(Agent):
    @callable
    def database(self):
        return self._gw_host.database()


async def test_close_closes_everything_after_a_background_loop_died(make_runtime):
    async with make_runtime({"k": Keeper}) as rt:
        db = await asyncio.wait_for(rt.call("k", "1", "database"), WAIT_S)

        async def dies() -> None:
            raise RuntimeError("a background loop died")

        dead = asyncio.get_running_loop().create_task(dies())
        await asyncio.wait([dead], timeout=WAIT_S)
        rt._background.append(dead)  # as if one of the runtime's own loops had died

        await asyncio.wait_for(rt.close(), WAIT_S)

        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            db.connection.execute("SELECT 1")
        assert rt._executor is not None and rt._executor._shutdown
        assert not rt.healthy()
