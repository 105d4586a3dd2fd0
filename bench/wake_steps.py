"""Where a cold wake goes inside the runtime: the time between successive steps, medians.

    python bench/wake_steps.py                 # 1000 agents
    python bench/wake_steps.py --agents 500

Creates `--agents` agents (bench/agents.py's `BenchAgent`), hibernates them (connections
closed, not parked), then wakes each with one call, as `bench/agents.py --wake-only` does.
During the wakes it records a timestamp (`perf_counter_ns`) at the entry and exit of the
wake's steps (file name, page-cache probe, connect, keep_wal, mark_awake, each turn, the
commit) and at the start of every SQL statement (SQLite's trace callback), and prints the
median gap between consecutive marks. The marks themselves cost ~1 µs each, so small steps
read high; use it to see where the time goes, and bench/agents.py to measure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.agents import BenchAgent, _raise_fd_limit
from gatewayd import gctuning
from gatewayd.agents import keepwal, scheduler, storage, turn
from gatewayd.agents.runtime import AgentRuntime
from gatewayd.agents.settings import AgentSettings

_marks: list[tuple[str, int]] = []
_recording = [False]


def _mark(name: str) -> None:
    if _recording[0]:
        _marks.append((name, time.perf_counter_ns()))


def _wrap(owner: Any, attr: str, name: str) -> None:
    original: Callable[..., Any] = getattr(owner, attr)
    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            _mark(name + ">")
            result = await original(*args, **kwargs)
            _mark(name + "<")
            return result

        setattr(owner, attr, timed_async)
    else:

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            _mark(name + ">")
            result = original(*args, **kwargs)
            _mark(name + "<")
            return result

        setattr(owner, attr, timed)


def _instrument() -> None:
    _wrap(storage, "agent_db_file", "file name")
    _wrap(storage, "_warm_probe", "probe")
    _wrap(keepwal, "keep_wal", "keep_wal")
    _wrap(storage.AgentDatabase, "load_state", "load_state")
    _wrap(scheduler.SlotScheduler, "mark_awake", "mark_awake")
    _wrap(turn.TurnRunner, "run", "turn")
    connect = sqlite3.connect

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        _mark("connect>")
        conn = connect(*args, **kwargs)
        _mark("connect<")
        conn.set_trace_callback(lambda statement: _mark("sql: " + statement[:48]))
        return conn

    # storage's own `sqlite3` name only (the bench's other connections stay untraced).
    shim = type(sys)("sqlite3")
    shim.__dict__.update(sqlite3.__dict__)
    shim.connect = traced_connect  # type: ignore[attr-defined]
    storage.sqlite3 = shim  # type: ignore[attr-defined]


async def _run(agents: int) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="wake-steps-"))
    _raise_fd_limit(9 * agents + 256)
    runtime = AgentRuntime(AgentSettings(state_dir=state_dir), {"bench": BenchAgent})
    await runtime.start()
    gctuning.tune_for_serving()
    await asyncio.gather(*(runtime.call("bench", f"w{i}", "touch") for i in range(agents)))
    slots = runtime._scheduler
    runtime.hibernate_idle()
    while runtime.stats()["active_agents"] or slots.closing:
        await asyncio.sleep(0.05)
    slots.close_parked_before(float("inf"))
    while slots.closing:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    gaps: dict[str, list[int]] = defaultdict(list)
    totals = []
    for i in range(agents):
        _marks.clear()
        _recording[0] = True
        started = time.perf_counter_ns()
        _mark("call")
        await runtime.call("bench", f"w{i}", "touch")
        _mark("returned")
        _recording[0] = False
        totals.append(time.perf_counter_ns() - started)
        for index in range(1, len(_marks)):
            (before, at), (after, then) = _marks[index - 1], _marks[index]
            gaps[f"{index:02d} {before} -> {after}"].append(then - at)
    await runtime.close()
    for step in sorted(gaps):
        print(f"{statistics.median(gaps[step]) / 1e3:8.1f} µs  {step}  (n={len(gaps[step])})")
    print(f"wake p50 {statistics.median(totals) / 1e3:.1f} µs (with the marks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    opts = parser.parse_args()
    _instrument()
    asyncio.run(_run(opts.agents))
    os._exit(0)


if __name__ == "__main__":
    main()
