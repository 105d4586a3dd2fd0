"""Persisted FIFO of method calls for one agent: `_gw_queue` in the agent's own SQLite.

Like `schedules.py`, every method runs plain statements inside the caller's transaction and
never begins or commits; `now` is passed in (epoch seconds), the clock is never read.

The runtime drains it on enqueue AND on wake: `next_pending(now)` -> run -> `mark_done(id)` or
`mark_failed(id, error, now)`. A failed item waits for its backoff without holding the others
up (so after a failure, order is FIFO among ready items only), and once its retries are used up
it becomes a dead letter: status `dead`, kept with its last error, visible in `dead_letters()`,
skipped by `next_pending()` (a poisoned item never blocks the queue) until `requeue(id)`
(back of the line, attempts reset) or `remove(id)`.
"""

from __future__ import annotations

import builtins
import json
import logging
import random
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gatewayd.agents.retry import FailureDecision, RetryPolicy, decide_after_failure
from gatewayd.agents.schedules import check_epoch_s, check_method_name, clip_error, encode_payload

logger = logging.getLogger(__name__)

QueueStatus = Literal["pending", "dead"]
QUEUE_STATUSES: tuple[str, ...] = ("pending", "dead")
DEFAULT_QUEUE_RETRY = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=30.0)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS _gw_queue (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        method TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        retry TEXT,
        ready_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        dead_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS _gw_queue_order ON _gw_queue (status, seq)",
)
_COLUMNS = (
    "id, seq, method, payload, status, attempts, retry, ready_at, last_error, created_at, dead_at"
)


class QueueError(ValueError):
    """An invalid queue operation argument (unknown status, bad method name)."""


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One queued method call. `ready_at`: earliest time it may run (later after a failure)."""

    id: str
    seq: int  # FIFO position
    method: str
    payload: Any
    status: str  # "pending" or "dead"
    attempts: int  # failed attempts so far
    retry: RetryPolicy | None  # None: the store's default policy
    ready_at: float
    last_error: str | None
    created_at: float
    dead_at: float | None


class QueueStore:
    """The queue of one agent in its own SQLite connection (see the module docstring)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        *,
        default_retry: RetryPolicy = DEFAULT_QUEUE_RETRY,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(db, sqlite3.Connection):
            raise TypeError(f"queue: db must be a sqlite3.Connection, got {type(db).__name__}")
        self._db = db
        self._default_retry = default_retry
        self._rand = rand
        for statement in _SCHEMA:
            db.execute(statement)

    def push(
        self,
        method: str,
        payload: Any = None,
        *,
        retry: RetryPolicy | None = None,
        now: float,
    ) -> QueueItem:
        """Append a call to the back of the queue (not idempotent: each push is one call)."""
        method = check_method_name(method, what="queue", error=QueueError)
        now = check_epoch_s(now, name="now", what="queue", error=QueueError)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise QueueError(f"queue {method}: retry must be a RetryPolicy, got {retry!r}")
        payload_json = encode_payload(payload, what=f"queue {method}")
        item_id = uuid.uuid4().hex
        self._db.execute(
            "INSERT INTO _gw_queue (id, seq, method, payload, retry, ready_at, created_at) "
            "VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM _gw_queue), ?, ?, ?, ?, ?)",
            (
                item_id,
                method,
                payload_json,
                json.dumps(retry.to_options()) if retry is not None else None,
                now,
                now,
            ),
        )
        item = self.get(item_id)
        assert item is not None
        return item

    def get(self, item_id: str) -> QueueItem | None:
        items = self._select("WHERE id = ?", (item_id,))
        return items[0] if items else None

    def list(
        self, method: str | None = None, status: str | None = "pending"
    ) -> builtins.list[QueueItem]:
        """Items in FIFO order; `status=None` lists pending and dead alike."""
        if status is not None and status not in QUEUE_STATUSES:
            raise QueueError(f"queue: unknown status {status!r}; expected one of {QUEUE_STATUSES}")
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        if method is not None:
            clauses.append("method = ?")
            params.append(method)
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        return self._select(f"{where}ORDER BY seq", tuple(params))

    def remove(self, item_id: str) -> bool:
        """Dequeue an item (pending or dead) without running it."""
        cursor = self._db.execute("DELETE FROM _gw_queue WHERE id = ?", (item_id,))
        return cursor.rowcount > 0

    def next_pending(self, now: float | None = None) -> QueueItem | None:
        """The oldest pending item; with `now`, only one whose backoff has elapsed."""
        if now is None:
            items = self._select("WHERE status = 'pending' ORDER BY seq LIMIT 1", ())
        else:
            items = self._select(
                "WHERE status = 'pending' AND ready_at <= ? ORDER BY seq LIMIT 1", (now,)
            )
        return items[0] if items else None

    def next_ready_at(self) -> float | None:
        """Earliest time a pending item may run (to arm the agent's wake-up after a failure)."""
        value = (
            self._plain_cursor()
            .execute("SELECT MIN(ready_at) FROM _gw_queue WHERE status = 'pending'")
            .fetchone()[0]
        )
        return None if value is None else float(value)

    def mark_done(self, item_id: str) -> bool:
        """A successful run: the item is deleted. False if it was already gone."""
        return self.remove(item_id)

    def mark_failed(self, item_id: str, error: str, now: float) -> FailureDecision | None:
        """A failed run: retry after backoff, or dead-letter it. None if the item is gone."""
        item = self.get(item_id)
        if item is None:
            return None
        now = check_epoch_s(now, name="now", what="queue", error=QueueError)
        error = clip_error(error)
        policy = item.retry or self._default_retry
        decision = decide_after_failure(item.attempts + 1, policy, now, error, self._rand)
        if decision.retry_at is not None:
            self._db.execute(
                "UPDATE _gw_queue SET attempts = ?, last_error = ?, ready_at = ? WHERE id = ?",
                (decision.attempts, error, decision.retry_at, item_id),
            )
            logger.warning(
                "queue %s (id %s) failed, attempt %d/%d: %s; retrying in %.1fs",
                item.method,
                item_id,
                decision.attempts,
                policy.max_attempts,
                error,
                decision.retry_at - now,
            )
        else:
            self._db.execute(
                "UPDATE _gw_queue SET status = 'dead', attempts = ?, last_error = ?, dead_at = ? "
                "WHERE id = ?",
                (decision.attempts, error, now, item_id),
            )
            logger.error(
                "queue %s (id %s) gave up after %d attempts: %s; kept as a dead letter "
                "(requeue or remove it)",
                item.method,
                item_id,
                decision.attempts,
                error,
            )
        return decision

    def dead_letters(self) -> builtins.list[QueueItem]:
        return self.list(status="dead")

    def requeue(self, item_id: str, *, now: float = 0.0) -> bool:
        """Give a dead letter a new life at the back of the queue, ready at `now`.

        False if there is no dead item with that id (pending items are left alone).
        """
        cursor = self._db.execute(
            "UPDATE _gw_queue SET status = 'pending', attempts = 0, dead_at = NULL, "
            "ready_at = ?, seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM _gw_queue) "
            "WHERE id = ? AND status = 'dead'",
            (check_epoch_s(now, name="now", what="queue", error=QueueError), item_id),
        )
        return cursor.rowcount > 0

    def _plain_cursor(self) -> sqlite3.Cursor:
        cursor = self._db.cursor()
        cursor.row_factory = None  # rows as tuples whatever factory the runtime set
        return cursor

    def _select(self, tail: str, params: tuple[Any, ...]) -> builtins.list[QueueItem]:
        rows = (
            self._plain_cursor()
            .execute(f"SELECT {_COLUMNS} FROM _gw_queue {tail}", params)
            .fetchall()
        )
        return [_to_item(row) for row in rows]


def _to_item(row: tuple[Any, ...]) -> QueueItem:
    (item_id, seq, method, payload, status, attempts, retry, ready_at, last_error, created_at,
     dead_at) = row  # fmt: skip
    return QueueItem(
        id=item_id,
        seq=seq,
        method=method,
        payload=json.loads(payload),
        status=status,
        attempts=attempts,
        retry=RetryPolicy.from_options(json.loads(retry)) if retry is not None else None,
        ready_at=ready_at,
        last_error=last_error,
        created_at=created_at,
        dead_at=dead_at,
    )
