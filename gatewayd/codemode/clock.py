"""A program run's wall-clock budget, which stops while a person is asked for approval."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator


class RunClock:
    """A run's wall-clock budget, which stops while someone is asked to approve a tool call:
    a person's answer may take minutes, and the program is not running meanwhile."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._start = time.monotonic()
        self._paused_s = 0.0
        self._pausing = 0
        self._pause_start = 0.0

    def used_s(self) -> float:
        now = time.monotonic()
        current = now - self._pause_start if self._pausing else 0.0
        return now - self._start - self._paused_s - current

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self._pausing == 0:
            self._pause_start = time.monotonic()
        self._pausing += 1
        try:
            yield
        finally:
            self._pausing -= 1
            if self._pausing == 0:
                self._paused_s += time.monotonic() - self._pause_start

    async def expired(self, poll_s: float) -> None:
        """Returns once the budget is spent (never while paused); checks at least every
        `poll_s` while paused."""
        while True:
            remaining = self.budget_s - self.used_s()
            if remaining <= 0 and not self._pausing:
                return
            await asyncio.sleep(max(remaining, poll_s))
