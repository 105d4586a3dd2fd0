"""Fixtures for Code Mode tests: real sandbox worker processes (V8 through mini-racer).

Executors are shared by the tests of a module (one event loop per module, see `pytestmark`
in each module), so workers are started once per module, not once per test. Their workers
(and the replacements a test causes) outlive single tests by design: the leak check below
lets them run until the module ends, and then checks that closing the executor ended them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import pytest_asyncio

from gatewayd.codemode import CodeExecutor, Limits
from gatewayd.tools import Tool, tool_from_function
from tests.processes import command_line, descendants, kill_and_wait, left_running, running

# Tight enough that every abuse test ends in seconds, loose enough for a loaded 2-core machine.
ESCAPE_LIMITS = Limits(
    wall_time_s=3.0,
    cpu_time_s=60.0,
    heap_bytes=32 << 20,
    memory_bytes=128 << 20,
    max_result_chars=10_000,
    max_log_lines=20,
    max_log_chars=2_000,
    max_tool_calls=100,
)


WORKER_COMMAND = "gatewayd.codemode._worker"


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """tests/conftest.py's check, except for the sandbox workers of module-wide executors."""
    before = set(descendants())
    yield
    new = left_running([p for p in descendants() if p not in before])
    left = [p for p in new if WORKER_COMMAND not in command_line(p)]
    if left:
        described = [f"{pid} ({command_line(pid)})" for pid in left]
        kill_and_wait(left)
        pytest.fail(f"processes left running by this test, now killed: {', '.join(described)}")


@asynccontextmanager
async def shared_executor(limits: Limits, workers: int) -> AsyncIterator[CodeExecutor]:
    pool = CodeExecutor(limits, workers=workers)
    await pool.start()
    try:
        yield pool
    finally:
        pids = pool.worker_pids
        await pool.close()
    left = [pid for pid in pids if running(pid)] + pool.worker_pids
    if left:
        kill_and_wait(left)
        pytest.fail(f"sandbox workers still running after the executor closed: {left}")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def executor() -> AsyncIterator[CodeExecutor]:
    """One worker: consecutive runs reuse the same process, each with a fresh context."""
    async with shared_executor(Limits(wall_time_s=20.0), workers=1) as pool:
        yield pool


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def strict_executor() -> AsyncIterator[CodeExecutor]:
    async with shared_executor(ESCAPE_LIMITS, workers=2) as pool:
        yield pool


class Calls:
    """Tools that record what reached the host."""

    def __init__(self, hold_until_in_flight: int = 1) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        # echo holds every call until this many are in flight at once
        self.hold_until_in_flight = hold_until_in_flight
        self.release = asyncio.Event()

    def tools(self) -> list[Tool]:
        async def add(a: int, b: int) -> int:
            """Add two integers.

            Args:
                a: The first.
                b: The second.
            """
            self.seen.append(("add", {"a": a, "b": b}))
            return a + b

        async def echo(text: str) -> dict[str, str]:
            """Return the text it is given."""
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if self.in_flight >= self.hold_until_in_flight:
                self.release.set()
            await self.release.wait()
            self.in_flight -= 1
            self.seen.append(("echo", {"text": text}))
            return {"text": text}

        async def fail(reason: str) -> None:
            """Always fails."""
            raise RuntimeError(reason)

        return [tool_from_function(add), tool_from_function(echo), tool_from_function(fail)]
