"""Gateway-wide index of when each agent next needs waking, so start-up and the timer loop never
open every agent's SQLite file to find due schedules.

It is a hint: each agent's own database stays the source of truth. The runtime, after each
committed turn, calls `set_next(agent_class, agent_id, next_due_at)` with the earliest of the
agent's `ScheduleStore.next_due_at()` and `QueueStore.next_ready_at()` (None removes the entry),
and on start-up wakes every agent in `due(now)` and sleeps until `next_wake_at()`. An entry that
is too early costs one needless wake (the agent then re-sets it); a missing or too-late entry
would delay a schedule, which is why the agent DB is written first and this index second, and
why the runtime should re-set the entry whenever it wakes an agent anyway.

Storage: its own small SQLite file (e.g. `<state dir>/schedule-index.sqlite3`), WAL,
`synchronous=NORMAL`, autocommit: each call is one short statement and its own transaction.
That survives a process crash; a power cut can lose the last updates since the previous WAL
checkpoint (pass `synchronous_full=True` to fsync every write, slower on SD cards).

`ScheduleIndex` is synchronous and thread-safe (one lock); `set_many` batches updates in one
transaction. The runtime never calls it on the event loop: a write may fsync (always with
`synchronous_full`, and in every automatic WAL checkpoint), and a read waits on the lock a
writer holds while it fsyncs. It uses `LoopScheduleIndex` instead: every file access runs on one
dedicated thread in submission order; `set_next` only records the update on the loop, and the
updates recorded in one loop iteration (and while a write is in flight) go to the file as one
transaction; a read runs after every update recorded before it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
# After a failed write (disk full, I/O error) the updates are kept and retried this much later.
_WRITE_RETRY_S = 1.0

_SCHEMA = """CREATE TABLE IF NOT EXISTS _gw_schedule_index (
    agent_class TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    next_due_at REAL NOT NULL,
    PRIMARY KEY (agent_class, agent_id)
) WITHOUT ROWID"""
_TIME_INDEX = (
    "CREATE INDEX IF NOT EXISTS _gw_schedule_index_due ON _gw_schedule_index (next_due_at)"
)


class ScheduleIndexClosedError(RuntimeError):
    """The index was used after `close()`."""


class DueAgent(NamedTuple):
    agent_class: str
    agent_id: str
    due_at: float


class ScheduleIndex:
    """The index file at `path` (created if missing)."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous_full: bool = False) -> None:
        self._path = os.fspath(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous_full else 'NORMAL'}")
            self._db.execute(_SCHEMA)
            self._db.execute(_TIME_INDEX)
        except sqlite3.Error:
            self._db.close()
            self._db = None
            raise

    def set_next(self, agent_class: str, agent_id: str, next_due_at: float | None) -> None:
        """Record when the agent next needs waking; None removes it (nothing scheduled)."""
        self.set_many([(agent_class, agent_id, next_due_at)])

    def set_many(self, entries: Iterable[tuple[str, str, float | None]]) -> None:
        """Several `set_next` updates in one transaction (all or none)."""
        checked = [_check_entry(*entry) for entry in entries]
        with self._lock:
            db = self._open_db()
            db.execute("BEGIN IMMEDIATE")
            try:
                for agent_class, agent_id, next_due_at in checked:
                    if next_due_at is None:
                        db.execute(
                            "DELETE FROM _gw_schedule_index WHERE agent_class = ? AND agent_id = ?",
                            (agent_class, agent_id),
                        )
                    else:
                        db.execute(
                            "INSERT INTO _gw_schedule_index (agent_class, agent_id, next_due_at) "
                            "VALUES (?, ?, ?) ON CONFLICT (agent_class, agent_id) "
                            "DO UPDATE SET next_due_at = excluded.next_due_at",
                            (agent_class, agent_id, next_due_at),
                        )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def get(self, agent_class: str, agent_id: str) -> float | None:
        with self._lock:
            row = (
                self._open_db()
                .execute(
                    "SELECT next_due_at FROM _gw_schedule_index "
                    "WHERE agent_class = ? AND agent_id = ?",
                    (agent_class, agent_id),
                )
                .fetchone()
            )
        return None if row is None else float(row[0])

    def due(self, now: float, limit: int | None = None) -> list[DueAgent]:
        """Agents due at or before `now`, earliest first (at most `limit` if given)."""
        with self._lock:
            rows = (
                self._open_db()
                .execute(
                    "SELECT agent_class, agent_id, next_due_at FROM _gw_schedule_index "
                    "WHERE next_due_at <= ? ORDER BY next_due_at, agent_class, agent_id LIMIT ?",
                    (now, -1 if limit is None else limit),
                )
                .fetchall()
            )
        return [DueAgent(*row) for row in rows]

    def next_wake_at(self) -> float | None:
        """The earliest due time of any agent, or None when nothing is scheduled."""
        with self._lock:
            row = (
                self._open_db()
                .execute("SELECT MIN(next_due_at) FROM _gw_schedule_index")
                .fetchone()
            )
        return None if row[0] is None else float(row[0])

    def __len__(self) -> int:
        with self._lock:
            count = self._open_db().execute("SELECT COUNT(*) FROM _gw_schedule_index").fetchone()
        return int(count[0])

    def close(self) -> None:
        """Close the file; idempotent."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ScheduleIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise ScheduleIndexClosedError(f"schedule index {self._path}: used after close()")
        return self._db


class LoopScheduleIndex:
    """The `ScheduleIndex` at `path`, used from the event loop: nothing here blocks the loop on
    the file (see the module docstring). Open with `open()` (it waits for the file to open, on
    the index thread, so start-up still fails fast); close with `close()`."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous_full: bool = False) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatewayd-index")
        self._loop = asyncio.get_running_loop()
        self._pending: dict[tuple[str, str], float | None] = {}
        self._flush_scheduled = False
        self._writing = 0
        try:
            self._index = self._thread.submit(
                ScheduleIndex, path, synchronous_full=synchronous_full
            ).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            raise

    def set_next(self, agent_class: str, agent_id: str, next_due_at: float | None) -> None:
        """Record an update (checked now, written soon, on the index thread)."""
        agent_class, agent_id, next_due_at = _check_entry(agent_class, agent_id, next_due_at)
        self._pending[agent_class, agent_id] = next_due_at
        if not self._flush_scheduled and not self._writing:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    async def due(self, now: float, limit: int | None = None) -> list[DueAgent]:
        return await self._read(self._index.due, now, limit)

    async def next_wake_at(self) -> float | None:
        return await self._read(self._index.next_wake_at)

    async def get(self, agent_class: str, agent_id: str) -> float | None:
        return await self._read(self._index.get, agent_class, agent_id)

    def close(self) -> None:
        """Write what is recorded, close the file and end the thread (waits for both: called
        once, at shut-down)."""
        self._flush(force=True)
        self._thread.submit(self._index.close)
        self._thread.shutdown(wait=True)

    async def _read(self, read: Callable[..., T], *args: object) -> T:
        self._flush(force=True)  # the thread runs jobs in order: the read sees every update
        return await self._loop.run_in_executor(self._thread, read, *args)

    def _flush(self, *, force: bool = False) -> None:
        self._flush_scheduled = False
        if not self._pending or (self._writing and not force):
            return
        entries = [(key[0], key[1], due_at) for key, due_at in self._pending.items()]
        self._pending.clear()
        self._writing += 1
        written = self._loop.run_in_executor(self._thread, self._index.set_many, entries)
        written.add_done_callback(lambda done: self._written(done, entries))

    def _written(
        self, done: asyncio.Future[None], entries: list[tuple[str, str, float | None]]
    ) -> None:
        self._writing -= 1
        error = None if done.cancelled() else done.exception()
        if error is not None:
            logger.error(
                "agents: schedule index: writing %d updates failed (%s: %s); retrying in %gs. "
                "Until then those agents' schedules wait for their next wake",
                len(entries),
                type(error).__name__,
                error,
                _WRITE_RETRY_S,
            )
            for agent_class, agent_id, due_at in entries:
                self._pending.setdefault((agent_class, agent_id), due_at)  # newer ones win
            self._loop.call_later(_WRITE_RETRY_S, self._flush)
            return
        if self._pending and not self._writing:
            self._flush()


def _check_entry(
    agent_class: str, agent_id: str, next_due_at: float | None
) -> tuple[str, str, float | None]:
    if not isinstance(agent_class, str) or not agent_class:
        raise ValueError(
            f"schedule index: agent_class must be a non-empty string, got {agent_class!r}"
        )
    if not isinstance(agent_id, str):
        raise ValueError(f"schedule index: agent_id must be a string, got {agent_id!r}")
    if next_due_at is not None and (
        isinstance(next_due_at, bool)
        or not isinstance(next_due_at, int | float)
        or not math.isfinite(next_due_at)
    ):
        raise ValueError(
            f"schedule index: next_due_at for {agent_class}:{agent_id} must be finite epoch "
            f"seconds or None, got {next_due_at!r}"
        )
    return agent_class, agent_id, None if next_due_at is None else float(next_due_at)
