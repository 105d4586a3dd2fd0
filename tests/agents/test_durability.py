"""Kill the process mid-stream (SIGKILL) and check that every acknowledged event survived."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gatewayd.agents import Agent, callable

pytestmark = pytest.mark.timeout(60)

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable

    class Log(Agent):
        def on_start(self):
            self.sql("CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY)")

        @callable
        def put(self, n):
            self.sql("INSERT INTO seen (n) VALUES (?)", n)
            self.set_state({"last": n})

    async def main():
        rt = AgentRuntime(AgentSettings(state_dir=Path(sys.argv[1]), durability=sys.argv[2]),
                          {"log": Log})
        await rt.start()
        n = 0
        while True:  # pipelined: many events in flight, acked as their commits finish
            batch = [(i, rt.submit_call("log", f"a{i % 4}", "put", i)) for i in range(n, n + 64)]
            n += 64
            for i, fut in batch:
                await fut
                print(i, flush=True)

    asyncio.run(main())
    """
)


class Log(Agent):
    @callable
    def seen(self):
        return [row["n"] for row in self.sql("SELECT n FROM seen ORDER BY n")]


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_acked_events_survive_sigkill(make_runtime, tmp_path, durability):
    state_dir = tmp_path / "state"
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir), durability],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    acked: list[int] = []
    assert child.stdout is not None
    for line in child.stdout:
        acked.append(int(line))
        if len(acked) >= 2000:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    async with make_runtime({"log": Log}, durability=durability) as rt:
        survived = set()
        for agent in range(4):
            survived.update(await rt.call("log", f"a{agent}", "seen"))
    missing = [n for n in acked if n not in survived]
    assert missing == [], f"acknowledged but lost after SIGKILL: {missing[:10]}"
