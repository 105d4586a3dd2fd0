"""Waiting in tests on a condition, never on a fixed sleep: poll it, with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

POLL_INTERVAL_S = 0.02


async def wait_until(
    predicate: Callable[[], object], timeout_s: float, what: str, *, poll_s: float = POLL_INTERVAL_S
) -> None:
    """Return as soon as `predicate()` is true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(poll_s)


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    accept: Callable[[Any], bool],
    timeout_s: float,
    what: str,
) -> Any:
    """`wait_until` for a condition that must be awaited (a call into an agent, an HTTP
    request): await `probe()` until `accept(value)`; return that value, or fail naming `what`
    and the last value seen after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {value!r}")
        await asyncio.sleep(POLL_INTERVAL_S)
