"""`AgentRuntime.healthy()` under a stalled disk: unhealthy, and said once, not per sample."""

import asyncio
import logging
import threading

from gatewayd.agents.storage import AgentDatabase
from tests.agents.test_runtime import Recorder


async def test_a_stuck_commit_is_logged_once_per_episode(make_runtime, monkeypatch, caplog):
    async with make_runtime({"rec": Recorder}, turn_timeout_s=0.1, durability="full") as rt:
        await rt.call("rec", "h", "log")
        release = threading.Event()
        real_commit = AgentDatabase.commit

        def stalled_commit(self):
            release.wait(10)  # a disk that stalls until the test lets it go
            real_commit(self)

        monkeypatch.setattr(AgentDatabase, "commit", stalled_commit)
        pending = rt.submit_call("rec", "h", "slow", 0, "x")
        caplog.set_level(logging.ERROR, logger="gatewayd.agents.runtime")
        async with asyncio.timeout(5):
            while rt.healthy():
                await asyncio.sleep(0.02)
        for _ in range(20):  # the daemon samples health twice a second
            assert not rt.healthy()
        stuck_lines = [r for r in caplog.records if "disk stuck" in r.getMessage()]
        assert len(stuck_lines) == 1
        release.set()
        assert await pending == "x"
        assert rt.healthy()
