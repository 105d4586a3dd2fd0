"""Tests for gatewayd/agents/schedules.py on real SQLite files, driven like the runtime does:
each "turn" is BEGIN ... COMMIT around store calls, with `now` passed in."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gatewayd.agents import schedules as schedules_module
from gatewayd.agents.retry import RetryPolicy
from gatewayd.agents.schedules import (
    DEFAULT_SCHEDULE_RETRY,
    PayloadError,
    ScheduleError,
    ScheduleStore,
)
from tests.agents.turns import open_db, turn

T0 = datetime(2026, 11, 26, 8, 50, tzinfo=UTC).timestamp()


@pytest.fixture
def store(db: sqlite3.Connection) -> ScheduleStore:
    with turn(db):
        return ScheduleStore(db, rand=lambda: 0.5)


def test_delayed_schedule_is_persisted_with_its_payload(
    db: sqlite3.Connection, store: ScheduleStore, db_path: Path
) -> None:
    with turn(db):
        created = store.add(10, "ping", {"room": "kitchen", "n": [1, 2]}, now=T0)
    assert created.kind == "delayed"
    assert created.time == T0 + 10
    assert created.delay_s == 10.0
    assert created.payload == {"room": "kitchen", "n": [1, 2]}
    assert created.status == "pending" and created.attempts == 0
    db.close()
    reopened = ScheduleStore(open_db(db_path))
    assert reopened.get(created.id) == created


def test_store_never_commits_or_rolls_back(db: sqlite3.Connection, db_path: Path) -> None:
    db.execute("BEGIN")
    store = ScheduleStore(db)
    added = store.add(5, "ping", now=T0)
    store.mark_started(added.id, T0 + 5)
    store.mark_failed(added.id, T0 + 6, "boom")
    assert db.in_transaction
    db.execute("ROLLBACK")
    other = open_db(db_path)
    tables = other.execute("SELECT name FROM sqlite_master WHERE name LIKE '_gw_%'").fetchall()
    assert tables == []


def test_delayed_registration_is_idempotent_while_pending(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    with turn(db):
        first = store.add(60, "poll", {"a": 1, "b": 2}, now=T0)
    with turn(db):  # the agent woke again and on_start re-registered
        again = store.add(60, "poll", {"b": 2, "a": 1}, now=T0 + 30)
    assert again.id == first.id
    assert again.time == T0 + 60, "re-registering must not push the pending run out"
    with turn(db):
        other_payload = store.add(60, "poll", {"a": 2}, now=T0)
        other_delay = store.add(61, "poll", {"a": 1, "b": 2}, now=T0)
        other_method = store.add(60, "poll_more", {"a": 1, "b": 2}, now=T0)
    assert len({first.id, other_payload.id, other_delay.id, other_method.id}) == 4
    assert len(store.list()) == 4


def test_delayed_handler_rearming_itself_gets_a_new_row(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    with turn(db):
        first = store.add(60, "poll", now=T0)
    with turn(db):
        store.mark_started(first.id, T0 + 60)
    with turn(db):  # inside poll(): schedule(60, "poll") again
        rearmed = store.add(60, "poll", now=T0 + 60)
        assert store.mark_done(first.id, T0 + 61)
    assert rearmed.id != first.id
    assert [s.id for s in store.list()] == [rearmed.id]
    assert rearmed.time == T0 + 120


def test_at_schedule_is_idempotent_and_needs_an_aware_datetime(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    at = datetime(2026, 12, 24, 18, 0, tzinfo=timezone(timedelta(hours=1)))
    with turn(db):
        first = store.add(at, "lights_on", now=T0)
        store.mark_started(first.id, at.timestamp())
        again = store.add(at, "lights_on", now=T0 + 1)  # running still matches for `at`
    assert first.kind == "at" and first.time == at.timestamp()
    assert again.id == first.id
    with pytest.raises(ScheduleError, match="no timezone"):
        store.add(datetime(2026, 12, 24, 18, 0), "lights_on", now=T0)


def test_cron_schedule_next_time_and_idempotency(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    with turn(db):
        first = store.add("*/15 * * * *", "report", now=T0)
        again = store.add("*/15  *  * * *", "report", now=T0 + 100)
    assert first.kind == "cron" and first.cron == "*/15 * * * *"
    assert first.time == datetime(2026, 11, 26, 9, 0, tzinfo=UTC).timestamp()
    assert again == first


def test_bad_cron_names_the_field(store: ScheduleStore) -> None:
    with pytest.raises(ScheduleError, match=r"schedule report: .*hour field '25'"):
        store.add("0 25 * * *", "report", now=T0)
    assert store.list() == []


def test_interval_first_run_and_idempotency(db: sqlite3.Connection, store: ScheduleStore) -> None:
    with turn(db):
        first = store.add_every(30, "sample", {"sensor": 1}, now=T0)
        again = store.add_every(30.0, "sample", {"sensor": 1}, now=T0 + 5)
        quick = store.add(0, "sample", {"sensor": 2}, every_s=30, now=T0)
    assert first.kind == "interval" and first.every_s == 30.0 and first.time == T0 + 30
    assert again.id == first.id
    assert quick.time == T0 and quick.kind == "interval"
    with pytest.raises(ScheduleError, match="every_s"):
        store.add_every(0, "sample", now=T0)
    with pytest.raises(ScheduleError, match=r"with every_s, when \(first-run delay\) must be"):
        store.add("*/5 * * * *", "sample", every_s=30, now=T0)


@pytest.mark.parametrize(
    ("when", "message"),
    [
        (-1, "delay must be finite and >= 0"),
        (float("nan"), "delay must be finite"),
        (float("inf"), "delay must be finite"),
        (True, "when must be seconds"),
        ([5], "when must be seconds"),
        (None, "when must be seconds"),
    ],
)
def test_invalid_when_is_rejected(store: ScheduleStore, when: object, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        store.add(when, "ping", now=T0)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["", "not a name", "1st", None, "x" * 201])
def test_invalid_method_is_rejected(store: ScheduleStore, method: object) -> None:
    with pytest.raises(ScheduleError, match="method"):
        store.add(5, method, now=T0)  # type: ignore[arg-type]


def test_payload_must_be_json(store: ScheduleStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PayloadError, match="schedule ping: payload must be JSON-serializable"):
        store.add(5, "ping", {"when": datetime.now(UTC)}, now=T0)
    with pytest.raises(PayloadError, match="JSON"):
        store.add(5, "ping", float("nan"), now=T0)
    monkeypatch.setattr(schedules_module, "MAX_PAYLOAD_BYTES", 100)
    with pytest.raises(PayloadError, match="over the 100 limit"):
        store.add(5, "ping", "x" * 200, now=T0)
    assert store.list() == []
    assert issubclass(PayloadError, ValueError)


def test_due_list_next_due_at_and_cancel(db: sqlite3.Connection, store: ScheduleStore) -> None:
    with turn(db):
        late = store.add(300, "b", now=T0)
        early = store.add(10, "a", now=T0)
        middle = store.add_every(60, "c", now=T0)
    assert store.next_due_at() == T0 + 10
    assert [s.id for s in store.due(T0 + 60)] == [early.id, middle.id]
    assert store.due(T0 + 9) == []
    assert [s.id for s in store.list()] == [early.id, middle.id, late.id]
    assert [s.id for s in store.list(kind="interval")] == [middle.id]
    assert [s.id for s in store.list(method="b")] == [late.id]
    assert [s.id for s in store.list(due_before=T0 + 10)] == [early.id]
    with pytest.raises(ScheduleError, match="unknown kind"):
        store.list(kind="weekly")
    with turn(db):
        assert store.cancel(early.id)
        assert not store.cancel(early.id)
    assert store.next_due_at() == T0 + 60
    with turn(db):
        store.cancel(middle.id)
        store.cancel(late.id)
    assert store.next_due_at() is None


def test_mark_done_deletes_one_shots_and_rearms_recurring(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    with turn(db):
        once = store.add(1, "once", now=T0)
        cron = store.add("0 * * * *", "hourly", now=T0)
        every = store.add_every(10, "tick", now=T0)
    finished_at = datetime(2026, 11, 26, 9, 0, 7, tzinfo=UTC).timestamp()
    with turn(db):
        for schedule in (once, cron, every):
            assert store.mark_started(schedule.id, finished_at - 5)
            assert store.mark_done(schedule.id, finished_at)
    assert store.get(once.id) is None
    rearmed_cron = store.get(cron.id)
    assert rearmed_cron is not None and rearmed_cron.status == "pending"
    assert rearmed_cron.time == datetime(2026, 11, 26, 10, 0, tzinfo=UTC).timestamp()
    rearmed_every = store.get(every.id)
    assert rearmed_every is not None and rearmed_every.time == finished_at + 10
    assert rearmed_every.started_at is None
    assert not store.mark_done("no-such-id", finished_at)
    assert not store.mark_started("no-such-id", finished_at)


def test_overlapping_interval_ticks_are_skipped_until_done_or_hung(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    with turn(db):
        every = store.add_every(10, "slow_job", now=T0)
    with turn(db):
        assert [s.id for s in store.due(T0 + 10)] == [every.id]
        store.mark_started(every.id, T0 + 10)
    # Ticks at +20 and +30 fall while the run is still going: not delivered again.
    assert store.due(T0 + 20) == []
    assert store.due(T0 + 39) == []
    # The only thing that can wake it now is the hung threshold (30 s after the start).
    assert store.next_due_at() == T0 + 40
    running = store.get(every.id)
    assert running is not None and running.status == "running" and running.started_at == T0 + 10
    with turn(db):
        store.mark_done(every.id, T0 + 35)
    assert store.next_due_at() == T0 + 45
    assert [s.id for s in store.due(T0 + 45)] == [every.id]


def test_hung_run_is_delivered_again(db: sqlite3.Connection, store: ScheduleStore) -> None:
    with turn(db):
        once = store.add(0, "flaky_device", now=T0)
        store.mark_started(once.id, T0)
    assert store.due(T0 + 29.9) == []
    # At-least-once: a crash or hang must not lose the run.
    assert [s.id for s in store.due(T0 + 30)] == [once.id]


def test_failures_back_off_then_move_to_the_failure_table(
    db: sqlite3.Connection, store: ScheduleStore, db_path: Path
) -> None:
    with turn(db):
        once = store.add(0, "upload", {"batch": 7}, now=T0)
    now = T0
    retry_times = []
    for attempt in range(1, DEFAULT_SCHEDULE_RETRY.max_attempts):
        with turn(db):
            store.mark_started(once.id, now)
            decision = store.mark_failed(once.id, now, f"timeout #{attempt}")
        assert decision is not None and not decision.gave_up
        assert decision.attempts == attempt
        # rand pinned at 0.5: half of min(2**n * 2 s, 60 s).
        assert decision.retry_at == pytest.approx(now + 0.5 * min(2**attempt * 2.0, 60.0))
        row = store.get(once.id)
        assert row is not None
        assert (row.status, row.attempts, row.time) == ("pending", attempt, decision.retry_at)
        assert row.last_error == f"timeout #{attempt}"
        assert store.next_due_at() == decision.retry_at
        retry_times.append(decision.retry_at - now)
        now = decision.retry_at
    assert retry_times == sorted(retry_times)
    with turn(db):
        final = store.mark_failed(once.id, now, "timeout #6")
    assert final is not None and final.gave_up and final.attempts == 6 and final.retry_at is None
    assert store.get(once.id) is None
    db.close()
    reopened = ScheduleStore(open_db(db_path))
    [failure] = reopened.failures()
    assert (failure.schedule_id, failure.method, failure.payload) == (
        once.id,
        "upload",
        {"batch": 7},
    )
    assert (failure.kind, failure.attempts, failure.error, failure.failed_at) == (
        "delayed",
        6,
        "timeout #6",
        now,
    )


def test_own_retry_policy_is_persisted_and_used(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    policy = RetryPolicy(max_attempts=2, base_delay_s=1.0, max_delay_s=1.5)
    with turn(db):
        scheduled = store.add(0, "reboot_modem", retry=policy, now=T0)
    assert store.get(scheduled.id).retry == policy  # type: ignore[union-attr]
    with turn(db):
        first = store.mark_failed(scheduled.id, T0, "no carrier")
        second = store.mark_failed(scheduled.id, T0 + 1, "no carrier")
    assert first is not None and first.retry_at == pytest.approx(T0 + 0.75)
    assert second is not None and second.gave_up
    assert [f.method for f in store.failures()] == ["reboot_modem"]
    with pytest.raises(ScheduleError, match="RetryPolicy"):
        store.add(0, "reboot_modem", retry={"max_attempts": 2}, now=T0)  # type: ignore[arg-type]


def test_recurring_give_up_is_recorded_and_the_schedule_continues(
    db: sqlite3.Connection, store: ScheduleStore
) -> None:
    with turn(db):
        cron = store.add("0 * * * *", "hourly_sync", retry=RetryPolicy(max_attempts=1), now=T0)
    failed_at = datetime(2026, 11, 26, 9, 0, 3, tzinfo=UTC).timestamp()
    with turn(db):
        decision = store.mark_failed(cron.id, failed_at, "server 503")
    assert decision is not None and decision.gave_up
    after = store.get(cron.id)
    assert after is not None
    assert after.time == datetime(2026, 11, 26, 10, 0, tzinfo=UTC).timestamp()
    assert (after.attempts, after.status, after.last_error) == (0, "pending", "server 503")
    assert [(f.schedule_id, f.error) for f in store.failures()] == [(cron.id, "server 503")]
    with turn(db):
        assert store.delete_failure(store.failures()[0].id)
    assert store.failures() == []


def test_failure_records_are_bounded(
    db: sqlite3.Connection, store: ScheduleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedules_module, "MAX_FAILURE_RECORDS", 3)
    with turn(db):
        every = store.add_every(1, "noisy", retry=RetryPolicy(max_attempts=1), now=T0)
        for n in range(5):
            store.mark_failed(every.id, T0 + n, f"error {n}")
    assert [f.error for f in store.failures()] == ["error 2", "error 3", "error 4"]


def test_failing_after_cancel_returns_none(db: sqlite3.Connection, store: ScheduleStore) -> None:
    with turn(db):
        once = store.add(0, "self_cancelling", now=T0)
        store.cancel(once.id)
        assert store.mark_failed(once.id, T0, "boom") is None
    assert store.failures() == []


def test_long_errors_are_clipped(db: sqlite3.Connection, store: ScheduleStore) -> None:
    with turn(db):
        once = store.add(0, "verbose", now=T0)
        decision = store.mark_failed(once.id, T0, "e" * 10_000)
    assert decision is not None
    assert len(decision.error) < 4_100 and decision.error.endswith("(truncated)")


def test_works_whatever_row_factory_the_runtime_uses(db: sqlite3.Connection) -> None:
    db.row_factory = lambda cursor, row: {
        d[0]: v for d, v in zip(cursor.description, row, strict=True)
    }
    with turn(db):
        store = ScheduleStore(db)
        added = store.add(5, "ping", [1], now=T0)
        assert store.get(added.id) == added
        assert store.next_due_at() == T0 + 5
        store.mark_failed(added.id, T0, "x")
    db.row_factory = sqlite3.Row
    assert ScheduleStore(db).list()[0].attempts == 1


def test_constructor_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"sqlite3\.Connection"):
        ScheduleStore(str(tmp_path / "x.sqlite3"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hung_after_s"):
        ScheduleStore(open_db(tmp_path / "y.sqlite3"), hung_after_s=0)
