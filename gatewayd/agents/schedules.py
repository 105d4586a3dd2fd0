"""Persisted schedules of one agent: `_gw_schedules` (and `_gw_schedule_failures`) in its SQLite.

Kinds: `delayed` (run once, N seconds from registration), `at` (run once at a datetime),
`cron` (5-field UTC cron string, see `cron.py`) and `interval` (every N seconds).

Transactions: every method runs plain statements on the connection it is given and never
begins, commits or rolls back: the agent runtime calls it inside the current turn's
transaction and commits (or discards) everything at once. The clock is never read here:
callers pass `now` (epoch seconds), which keeps turns deterministic and tests exact.

Delivery is at-least-once. The runtime's loop for one schedule is
`due(now)` -> `mark_started(id, now)` (commit, so overlap detection sees it) -> run the method ->
`mark_done(id, now)` or `mark_failed(id, now, error)`. A row left `running` longer than
`hung_after_s` (a crash, a hung handler) becomes due again.

Idempotent registration (agents call `schedule()` from `on_start` on every wake):
- `at`, `cron`, `interval`: the key is (method, kind, spec, payload JSON), spec being the epoch
  time, the normalised cron string, or `every_s` (not the first-run delay). Re-registering
  returns the existing row (pending or running) unchanged, whatever `retry` is passed. Once a
  one-shot `at` row has run it is deleted, so registering it again creates a new row (due at
  once if the time is past): agents should guard one-shot registrations with their own state.
- `delayed`: the absolute time differs on every call, so the key is (method, delay, payload)
  and only a *pending* row matches. A row that is running does not match, so a handler that
  re-arms itself (`schedule(60, "poll")` inside `poll`) gets a fresh row, while a wake that
  re-registers the same delay does not push the pending run further out.

Overlap: a row marked running is not delivered again until it is done or hung; for cron and
interval rows every tick falling in that window is skipped and the next time is computed from
the completion time (`mark_done(id, now)`), so runs never pile up.

Failures are never dropped: `mark_failed` retries with full-jitter backoff (default like
Durable Object alarms: 2 s base, 6 attempts) or, when the policy is used up, records the
failure in `_gw_schedule_failures` (kept, newest `MAX_FAILURE_RECORDS`) and logs an error;
one-shot rows are then removed, recurring rows move on to their next tick.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import math
import random
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gatewayd.agents.cron import CronExpression
from gatewayd.agents.retry import FailureDecision, RetryPolicy, decide_after_failure

logger = logging.getLogger(__name__)

ScheduleKind = Literal["delayed", "at", "cron", "interval"]
SCHEDULE_KINDS: tuple[str, ...] = ("delayed", "at", "cron", "interval")
ONE_SHOT_KINDS = frozenset({"delayed", "at"})

DEFAULT_SCHEDULE_RETRY = RetryPolicy(max_attempts=6, base_delay_s=2.0, max_delay_s=60.0)
DEFAULT_HUNG_AFTER_S = 30.0
# Under the 2 MB row limit that Durable Objects enforce, like ai-chat's row size guard.
MAX_PAYLOAD_BYTES = 1_800_000
MAX_ERROR_CHARS = 4_000
MAX_FAILURE_RECORDS = 1_000
MAX_METHOD_NAME_CHARS = 200

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS _gw_schedules (
        id TEXT PRIMARY KEY,
        method TEXT NOT NULL,
        payload TEXT NOT NULL,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        time REAL NOT NULL,
        cron TEXT,
        every_s REAL,
        delay_s REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        retry TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
        started_at REAL,
        last_error TEXT,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS _gw_schedules_key ON _gw_schedules (method, kind, spec)",
    """CREATE TABLE IF NOT EXISTS _gw_schedule_failures (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        schedule_id TEXT NOT NULL,
        method TEXT NOT NULL,
        payload TEXT NOT NULL,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        error TEXT NOT NULL,
        failed_at REAL NOT NULL
    )""",
)
_COLUMNS = (
    "id, method, payload, kind, time, cron, every_s, delay_s, attempts, retry, status, "
    "started_at, last_error, created_at"
)
# When a row can next be delivered: its time, or for a running row the moment it counts as hung.
_DUE_AT = "(CASE status WHEN 'running' THEN started_at + :hung ELSE time END)"


class PayloadError(ValueError):
    """A schedule or queue payload that cannot be stored (not JSON, or too large)."""


class ScheduleError(ValueError):
    """An invalid schedule registration (bad time, delay, cron string, method name)."""


def encode_payload(payload: Any, *, what: str) -> str:
    """Canonical JSON (sorted keys, so equal payloads give equal keys); `what` names the caller."""
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise PayloadError(f"{what}: payload must be JSON-serializable ({err})") from err
    size_bytes = len(text.encode("utf-8"))
    if size_bytes > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"{what}: payload is {size_bytes} bytes as JSON, over the {MAX_PAYLOAD_BYTES} limit"
        )
    return text


def check_method_name(method: Any, *, what: str, error: type[ValueError] = ScheduleError) -> str:
    """Method names must be Python identifiers: they name a method on the agent class."""
    if not isinstance(method, str) or not method.isidentifier():
        raise error(f"{what}: method must be an identifier string, got {method!r}")
    if len(method) > MAX_METHOD_NAME_CHARS:
        raise error(f"{what}: method name longer than {MAX_METHOD_NAME_CHARS} chars")
    return method


def check_epoch_s(
    value: Any, *, name: str, what: str, error: type[ValueError] = ScheduleError
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error(f"{what}: {name} must be finite epoch seconds, got {value!r}")
    return float(value)


def clip_error(error: Any) -> str:
    text = str(error)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "...(truncated)"


@functools.lru_cache(maxsize=256)
def _parse_cron(expression: str) -> CronExpression:
    return CronExpression.parse(expression)


@dataclass(frozen=True, slots=True)
class Schedule:
    """One registered schedule. `time` is when it is next due (epoch seconds)."""

    id: str
    method: str
    payload: Any
    kind: str
    time: float
    cron: str | None
    every_s: float | None
    delay_s: float | None
    attempts: int  # failed attempts of the current occurrence
    retry: RetryPolicy | None  # None: the store's default policy
    status: str  # "pending" or "running"
    started_at: float | None
    last_error: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class ScheduleFailure:
    """A schedule occurrence that used up its retries (visible, never silently dropped)."""

    id: int
    schedule_id: str
    method: str
    payload: Any
    kind: str
    spec: str
    attempts: int
    error: str
    failed_at: float


class ScheduleStore:
    """Schedules of one agent in its own SQLite connection (see the module docstring)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        *,
        default_retry: RetryPolicy = DEFAULT_SCHEDULE_RETRY,
        hung_after_s: float = DEFAULT_HUNG_AFTER_S,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(db, sqlite3.Connection):
            raise TypeError(f"schedules: db must be a sqlite3.Connection, got {type(db).__name__}")
        if not math.isfinite(hung_after_s) or hung_after_s <= 0:
            raise ValueError(f"schedules: hung_after_s must be > 0, got {hung_after_s!r}")
        self._db = db
        self._default_retry = default_retry
        self._hung_after_s = float(hung_after_s)
        self._rand = rand
        for statement in _SCHEMA:
            db.execute(statement)

    # -- registration -----------------------------------------------------------------------

    def add(
        self,
        when: float | int | datetime | str,
        method: str,
        payload: Any = None,
        *,
        every_s: float | None = None,
        retry: RetryPolicy | None = None,
        now: float,
    ) -> Schedule:
        """Register (idempotently) a schedule and return it.

        `when`: seconds from now (delayed), an aware datetime (at) or a cron string (cron).
        With `every_s`, the schedule is an interval and `when` is the delay before the first
        run in seconds (`add_every` uses `every_s` for it, as the SDK's scheduleEvery).
        """
        method = check_method_name(method, what="schedule")
        now = check_epoch_s(now, name="now", what="schedule")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ScheduleError(f"schedule {method}: retry must be a RetryPolicy, got {retry!r}")
        payload_json = encode_payload(payload, what=f"schedule {method}")
        cron: str | None = None
        delay_s: float | None = None
        if every_s is not None:
            kind = "interval"
            every_s = _positive_seconds(every_s, "every_s", method)
            first_delay_s = _delay_seconds(
                when, method, context="with every_s, when (first-run delay)"
            )
            spec, time = repr(every_s), now + first_delay_s
        elif isinstance(when, datetime):
            if when.tzinfo is None or when.utcoffset() is None:
                raise ScheduleError(
                    f"schedule {method}: datetime {when.isoformat()} has no timezone; "
                    "pass an aware one, e.g. datetime.now(UTC)"
                )
            kind, time = "at", when.timestamp()
            spec = repr(time)
        elif isinstance(when, str):
            kind = "cron"
            try:
                expression = _parse_cron(when)
            except ValueError as err:
                raise ScheduleError(f"schedule {method}: {err}") from err
            cron = spec = expression.source
            time = expression.next_after_ts(now)
        else:
            kind = "delayed"
            delay_s = _delay_seconds(when, method)
            spec, time = repr(delay_s), now + delay_s

        existing = self._find_same(method, kind, spec, payload_json)
        if existing is not None:
            return existing
        schedule_id = uuid.uuid4().hex
        self._db.execute(
            "INSERT INTO _gw_schedules (id, method, payload, kind, spec, time, cron, every_s, "
            "delay_s, retry, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                schedule_id,
                method,
                payload_json,
                kind,
                spec,
                time,
                cron,
                every_s,
                delay_s,
                json.dumps(retry.to_options()) if retry is not None else None,
                now,
            ),
        )
        created = self.get(schedule_id)
        assert created is not None
        return created

    def add_every(
        self,
        every_s: float,
        method: str,
        payload: Any = None,
        *,
        retry: RetryPolicy | None = None,
        now: float,
    ) -> Schedule:
        """An interval schedule whose first run is `every_s` from now (SDK `scheduleEvery`)."""
        return self.add(every_s, method, payload, every_s=every_s, retry=retry, now=now)

    def _find_same(self, method: str, kind: str, spec: str, payload_json: str) -> Schedule | None:
        status_filter = " AND status = 'pending'" if kind == "delayed" else ""
        rows = self._select(
            f"WHERE method = :method AND kind = :kind AND spec = :spec AND payload = :payload"
            f"{status_filter} ORDER BY rowid LIMIT 1",
            {"method": method, "kind": kind, "spec": spec, "payload": payload_json},
        )
        return rows[0] if rows else None

    # -- reading ----------------------------------------------------------------------------

    def get(self, schedule_id: str) -> Schedule | None:
        rows = self._select("WHERE id = :id", {"id": schedule_id})
        return rows[0] if rows else None

    def list(
        self,
        kind: str | None = None,
        method: str | None = None,
        due_before: float | None = None,
    ) -> builtins.list[Schedule]:
        """Schedules ordered by when they can next run; `due_before` includes that time."""
        if kind is not None and kind not in SCHEDULE_KINDS:
            raise ScheduleError(
                f"schedules: unknown kind {kind!r}; expected one of {SCHEDULE_KINDS}"
            )
        clauses: builtins.list[str] = []
        params: dict[str, Any] = {}
        if kind is not None:
            clauses.append("kind = :kind")
            params["kind"] = kind
        if method is not None:
            clauses.append("method = :method")
            params["method"] = method
        if due_before is not None:
            clauses.append(f"{_DUE_AT} <= :due_before")
            params["due_before"] = due_before
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        return self._select(f"{where}ORDER BY {_DUE_AT}, rowid", params)

    def due(self, now: float) -> builtins.list[Schedule]:
        """Schedules to deliver now, oldest due first; running rows only once hung."""
        return self.list(due_before=now)

    def next_due_at(self) -> float | None:
        """Earliest time anything can become due (for the agent's alarm and the index)."""
        value = self._fetchone(
            f"SELECT MIN({_DUE_AT}) FROM _gw_schedules", {"hung": self._hung_after_s}
        )[0]
        return None if value is None else float(value)

    def failures(self, method: str | None = None) -> builtins.list[ScheduleFailure]:
        """Recorded give-ups, oldest first."""
        sql = (
            "SELECT id, schedule_id, method, payload, kind, spec, attempts, error, failed_at "
            "FROM _gw_schedule_failures"
        )
        params: tuple[Any, ...] = ()
        if method is not None:
            sql, params = sql + " WHERE method = ?", (method,)
        rows = self._plain_cursor().execute(sql + " ORDER BY id", params).fetchall()
        return [
            ScheduleFailure(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7], r[8])
            for r in rows
        ]

    def delete_failure(self, failure_id: int) -> bool:
        cursor = self._db.execute("DELETE FROM _gw_schedule_failures WHERE id = ?", (failure_id,))
        return cursor.rowcount > 0

    # -- changing ---------------------------------------------------------------------------

    def cancel(self, schedule_id: str) -> bool:
        cursor = self._db.execute("DELETE FROM _gw_schedules WHERE id = ?", (schedule_id,))
        return cursor.rowcount > 0

    def mark_started(self, schedule_id: str, now: float) -> bool:
        """Mark a delivery in progress; False if the schedule no longer exists."""
        cursor = self._db.execute(
            "UPDATE _gw_schedules SET status = 'running', started_at = ? WHERE id = ?",
            (check_epoch_s(now, name="now", what="schedules"), schedule_id),
        )
        return cursor.rowcount > 0

    def mark_done(self, schedule_id: str, now: float) -> bool:
        """A successful run: one-shot rows are deleted, recurring ones move to their next tick.

        False if the schedule no longer exists (e.g. the handler cancelled it).
        """
        now = check_epoch_s(now, name="now", what="schedules")
        schedule = self.get(schedule_id)
        if schedule is None:
            return False
        if schedule.kind in ONE_SHOT_KINDS:
            return self.cancel(schedule_id)
        self._rearm(schedule, now, last_error=None)
        return True

    def mark_failed(self, schedule_id: str, now: float, error: str) -> FailureDecision | None:
        """A failed run: retry with backoff, or give up visibly (see the module docstring).

        None if the schedule no longer exists (the handler cancelled it before failing).
        """
        schedule = self.get(schedule_id)
        if schedule is None:
            return None
        now = check_epoch_s(now, name="now", what="schedules")
        error = clip_error(error)
        policy = schedule.retry or self._default_retry
        decision = decide_after_failure(schedule.attempts + 1, policy, now, error, self._rand)
        if decision.retry_at is not None:
            self._db.execute(
                "UPDATE _gw_schedules SET status = 'pending', started_at = NULL, attempts = ?, "
                "last_error = ?, time = ? WHERE id = ?",
                (decision.attempts, error, decision.retry_at, schedule_id),
            )
            logger.warning(
                "schedule %s (%s, id %s) failed, attempt %d/%d: %s; retrying in %.1fs",
                schedule.method,
                schedule.kind,
                schedule_id,
                decision.attempts,
                policy.max_attempts,
                error,
                decision.retry_at - now,
            )
            return decision
        self._record_failure(schedule, decision.attempts, error, now)
        if schedule.kind in ONE_SHOT_KINDS:
            self.cancel(schedule_id)
            outcome = "removed; see _gw_schedule_failures"
        else:
            self._rearm(schedule, now, last_error=error)
            outcome = "recorded in _gw_schedule_failures; continuing with the next tick"
        logger.error(
            "schedule %s (%s, id %s) gave up after %d attempts: %s; %s",
            schedule.method,
            schedule.kind,
            schedule_id,
            decision.attempts,
            error,
            outcome,
        )
        return decision

    # -- internals --------------------------------------------------------------------------

    def _rearm(self, schedule: Schedule, now: float, *, last_error: str | None) -> None:
        if schedule.kind == "cron":
            assert schedule.cron is not None
            next_time = _parse_cron(schedule.cron).next_after_ts(now)
        else:
            assert schedule.every_s is not None
            next_time = now + schedule.every_s
        self._db.execute(
            "UPDATE _gw_schedules SET status = 'pending', started_at = NULL, attempts = 0, "
            "last_error = ?, time = ? WHERE id = ?",
            (last_error, next_time, schedule.id),
        )

    def _record_failure(self, schedule: Schedule, attempts: int, error: str, now: float) -> None:
        spec, payload_json = self._fetchone(
            "SELECT spec, payload FROM _gw_schedules WHERE id = ?", (schedule.id,)
        )
        self._db.execute(
            "INSERT INTO _gw_schedule_failures (schedule_id, method, payload, kind, spec, "
            "attempts, error, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                schedule.id,
                schedule.method,
                payload_json,
                schedule.kind,
                spec,
                attempts,
                error,
                now,
            ),
        )
        # Bounded: a recurring schedule failing every minute must not fill the agent's disk.
        self._db.execute(
            "DELETE FROM _gw_schedule_failures WHERE id <= "
            "(SELECT MAX(id) FROM _gw_schedule_failures) - ?",
            (MAX_FAILURE_RECORDS,),
        )

    def _plain_cursor(self) -> sqlite3.Cursor:
        cursor = self._db.cursor()
        cursor.row_factory = None  # rows as tuples whatever factory the runtime set
        return cursor

    def _fetchone(self, sql: str, params: Any) -> tuple[Any, ...]:
        row = self._plain_cursor().execute(sql, params).fetchone()
        assert row is not None
        return tuple(row)

    def _select(self, tail: str, params: dict[str, Any]) -> builtins.list[Schedule]:
        rows = (
            self._plain_cursor()
            .execute(
                f"SELECT {_COLUMNS} FROM _gw_schedules {tail}",
                {"hung": self._hung_after_s, **params},
            )
            .fetchall()
        )
        return [_to_schedule(row) for row in rows]


def _to_schedule(row: tuple[Any, ...]) -> Schedule:
    (sid, method, payload, kind, time, cron, every_s, delay_s, attempts, retry, status,
     started_at, last_error, created_at) = row  # fmt: skip
    return Schedule(
        id=sid,
        method=method,
        payload=json.loads(payload),
        kind=kind,
        time=time,
        cron=cron,
        every_s=every_s,
        delay_s=delay_s,
        attempts=attempts,
        retry=RetryPolicy.from_options(json.loads(retry)) if retry is not None else None,
        status=status,
        started_at=started_at,
        last_error=last_error,
        created_at=created_at,
    )


def _delay_seconds(value: Any, method: str, context: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        expected = (
            f"{context} must be seconds"
            if context
            else "when must be seconds (number), an aware datetime or a cron string"
        )
        raise ScheduleError(f"schedule {method}: {expected}, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ScheduleError(f"schedule {method}: delay must be finite and >= 0, got {value!r}")
    return float(value)


def _positive_seconds(value: Any, name: str, method: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ScheduleError(f"schedule {method}: {name} must be finite seconds > 0, got {value!r}")
    return float(value)
