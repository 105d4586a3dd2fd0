"""Supervision of long-lived background loops: nothing dies silently.

    supervisor = Supervisor("daemon")
    supervisor.spawn("alarms", alarm_loop)      # a zero-argument coroutine function
    ...
    supervisor.failing()   # {"alarms": "RuntimeError: ..."} while a loop is down
    await supervisor.stop()

A supervised loop is meant to run until cancelled. When it raises (or returns), the error is
logged with its traceback, the loop is marked *down* and restarted after a backoff that doubles
on each failure in a row (`backoff_min_s` .. `backoff_max_s`). It counts as up again once a
restart has survived `stable_after_s`; until then `failing()` names it, so `/healthz` and the
systemd watchdog can report the daemon unhealthy while a loop cannot run.

Everything here runs on the event loop; `failing()` must be read there too (the daemon
publishes it to the HTTP thread in an immutable health snapshot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

log = logging.getLogger(__name__)

RESTARTS = Counter(
    "gatewayd_background_loop_restarts_total",
    "Background loops restarted after they crashed or returned",
    ["owner", "loop"],
)

LoopFactory = Callable[[], Awaitable[None]]


class Supervisor:
    """Owns a set of named background loops (see the module docstring)."""

    def __init__(
        self,
        owner: str,
        *,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 5.0,
    ) -> None:
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError("backoff_min_s must be > 0 and <= backoff_max_s")
        self.owner = owner
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: dict[str, str] = {}
        self.restarts: dict[str, int] = {}

    def spawn(self, name: str, factory: LoopFactory) -> asyncio.Task[None]:
        """Start `factory()` under supervision; cancelling the returned task stops it for good."""
        if name in self._tasks and not self._tasks[name].done():
            raise ValueError(f"{self.owner}: a loop named {name!r} is already supervised")
        self.restarts.setdefault(name, 0)
        task = asyncio.get_running_loop().create_task(
            self._keep_running(name, factory), name=f"{self.owner}:{name}"
        )
        self._tasks[name] = task
        return task

    def failing(self) -> dict[str, str]:
        """Loops that are down (failed and not yet stable again), with their last error."""
        return dict(self._down)

    def healthy(self) -> tuple[bool, str]:
        if not self._down:
            return True, "ok"
        down = "; ".join(f"{name} ({why})" for name, why in sorted(self._down.items()))
        return False, f"{self.owner}: background loop down: {down}"

    async def stop(self) -> None:
        """Cancel every loop and wait for them to end."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._down.clear()

    async def _keep_running(self, name: str, factory: LoopFactory) -> None:
        loop = asyncio.get_running_loop()
        failures_in_a_row = 0
        while True:
            started = loop.time()
            stable = (
                loop.call_later(self.stable_after_s, self._mark_up, name)
                if name in self._down
                else None
            )
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                why = f"{type(err).__name__}: {err}"
                log.exception(
                    "%s: background loop %r crashed; restarting it (the daemon reports "
                    "unhealthy until it runs again). This is a bug: please report the traceback",
                    self.owner,
                    name,
                )
            else:
                why = "returned unexpectedly"
                log.error("%s: background loop %r %s; restarting it", self.owner, name, why)
            finally:
                if stable is not None:
                    stable.cancel()
            if loop.time() - started >= self.stable_after_s:
                failures_in_a_row = 0
            failures_in_a_row += 1
            self._down[name] = why
            self.restarts[name] += 1
            RESTARTS.labels(self.owner, name).inc()
            delay_s = min(self.backoff_max_s, self.backoff_min_s * 2 ** (failures_in_a_row - 1))
            log.warning(
                "%s: restarting %r in %.3gs (failure %d in a row)",
                self.owner,
                name,
                delay_s,
                failures_in_a_row,
            )
            await asyncio.sleep(delay_s)

    def _mark_up(self, name: str) -> None:
        if self._down.pop(name, None) is not None:
            log.info("%s: background loop %r is running again", self.owner, name)
