"""Waiting in tests on a condition, never on a fixed sleep: poll it, with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

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
