"""`eventually`: tests/waiting.py's `wait_until` for a condition that must be awaited (a
call into an agent)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.waiting import POLL_INTERVAL_S


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    accept: Callable[[Any], bool],
    timeout_s: float,
    what: str,
) -> Any:
    """Await `probe()` until `accept(value)`; return that value, or fail naming `what` and
    the last value seen after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {value!r}")
        await asyncio.sleep(POLL_INTERVAL_S)
