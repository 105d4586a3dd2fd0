"""Group commit: the COMMITs of every agent that finished a batch in the same event-loop
iteration go to the shared executor together, split over its threads.

Each agent's transaction is still committed on its own (one SQLite file per agent), and with
durability=full each COMMIT still fsyncs before its outputs are released; grouping only saves
the per-commit thread hand-offs, which dominate when a thousand agents commit small batches.
There is never a thread per agent: `threads` is a small fixed number.

The invariant this serves: no fsync ever runs on the event loop. Only commits that fsync come
here (durability="full"); with "normal" a COMMIT never fsyncs (automatic checkpoints are off
and the WAL is started off the loop, see storage.py), so the runtime commits inline and runs
only the WAL checkpoints on the executor.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol


class _Committable(Protocol):
    def commit(self) -> None: ...


def _commit_group(dbs: list[_Committable]) -> tuple[list[BaseException | None], float]:
    started = time.perf_counter()
    results: list[BaseException | None] = []
    for db in dbs:
        try:
            db.commit()
        except Exception as err:  # reported to that agent only
            results.append(err)
        else:
            results.append(None)
    return results, time.perf_counter() - started


class GroupCommitter:
    """`await committer.commit(db)` returns after `db.commit()` ran on the executor (or raises
    what it raised)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: ThreadPoolExecutor,
        threads: int,
        on_group_done: Callable[[int, float], None] | None = None,
    ) -> None:
        self._loop = loop
        self._executor = executor
        self._threads = threads
        self._pending: list[tuple[_Committable, asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._on_group_done = on_group_done
        self._in_flight: dict[int, float] = {}  # group number -> loop time it was handed off
        self._groups = 0

    def oldest_in_flight_s(self) -> float:
        """How long the oldest commit group has been running (0 when none): a stuck disk."""
        if not self._in_flight:
            return 0.0
        return self._loop.time() - min(self._in_flight.values())

    def commit(self, db: _Committable) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((db, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        groups = min(self._threads, len(pending))
        for index in range(groups):
            group = pending[index::groups]
            self._groups += 1
            self._in_flight[self._groups] = self._loop.time()
            work = self._loop.run_in_executor(
                self._executor, _commit_group, [db for db, _ in group]
            )
            work.add_done_callback(functools.partial(self._resolve, self._groups, group))

    def _resolve(
        self,
        number: int,
        group: list[tuple[_Committable, asyncio.Future[None]]],
        done: asyncio.Future[tuple[list[BaseException | None], float]],
    ) -> None:
        self._in_flight.pop(number, None)
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if error is not None:
            for _db, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        results, elapsed_s = done.result()
        if self._on_group_done is not None:
            self._on_group_done(len(group), elapsed_s)
        for (_db, future), result in zip(group, results, strict=True):
            if future.done():
                continue
            if result is None:
                future.set_result(None)
            else:
                future.set_exception(result)
