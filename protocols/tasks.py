"""How a transport starts its long-lived background loops, so that the gateway can supervise
them (log a crash, restart it with backoff, report unhealthy meanwhile) while `protocols` stays
free of `gatewayd`.

A transport starts each loop with `self.spawn_loop(name, loop_function)`; the default just
creates a task. The gateway replaces it with its supervisor's `spawn` (same signature), e.g.
`bridge.spawn_loop = supervisor.spawn`, before `start()`. Cancelling the returned task stops
the loop for good either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

LoopFunction = Callable[[], Awaitable[None]]
SpawnLoop = Callable[[str, LoopFunction], "asyncio.Task[None]"]


def spawn_unsupervised(name: str, loop_function: LoopFunction) -> asyncio.Task[None]:
    """The default: run the loop once; if it crashes, the task ends with the error."""

    async def run() -> None:
        await loop_function()

    return asyncio.get_running_loop().create_task(run(), name=name)
