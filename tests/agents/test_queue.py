"""Tests for gatewayd/agents/queue.py on real SQLite files, inside runtime-style turns."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gatewayd.agents.queue import DEFAULT_QUEUE_RETRY, QueueError, QueueStore
from gatewayd.agents.retry import RetryPolicy
from gatewayd.agents.schedules import PayloadError
from tests.agents.turns import open_db, turn

T0 = 1_800_000_000.0


@pytest.fixture
def queue(db: sqlite3.Connection) -> QueueStore:
    with turn(db):
        return QueueStore(db, rand=lambda: 0.5)


def drain(db: sqlite3.Connection, queue: QueueStore, now: float) -> list[str]:
    """Run every ready item successfully, as the runtime's drain loop does."""
    ran = []
    while (item := queue.next_pending(now)) is not None:
        with turn(db):
            ran.append(item.method)
            queue.mark_done(item.id)
    return ran


def test_fifo_order_survives_a_restart(
    db: sqlite3.Connection, queue: QueueStore, db_path: Path
) -> None:
    with turn(db):
        for index, method in enumerate(["open_valve", "set_rate", "close_valve"]):
            queue.push(method, {"step": index}, now=T0 + index)
    db.close()
    reopened_db = open_db(db_path)
    reopened = QueueStore(reopened_db)
    items = reopened.list()
    assert [(i.method, i.payload) for i in items] == [
        ("open_valve", {"step": 0}),
        ("set_rate", {"step": 1}),
        ("close_valve", {"step": 2}),
    ]
    assert [i.seq for i in items] == sorted(i.seq for i in items)
    assert drain(reopened_db, reopened, T0 + 10) == ["open_valve", "set_rate", "close_valve"]
    assert reopened.list(status=None) == []
    reopened_db.close()


def test_push_is_not_idempotent_and_get_returns_the_item(
    db: sqlite3.Connection, queue: QueueStore
) -> None:
    with turn(db):
        first = queue.push("beep", now=T0)
        second = queue.push("beep", now=T0)
    assert first.id != second.id
    assert queue.get(first.id) == first
    assert first.payload is None and first.status == "pending" and first.ready_at == T0
    assert queue.get("missing") is None


def test_queue_never_commits(db: sqlite3.Connection, db_path: Path) -> None:
    db.execute("BEGIN")
    queue = QueueStore(db)
    item = queue.push("beep", now=T0)
    queue.mark_failed(item.id, "boom", T0)
    assert db.in_transaction
    db.execute("ROLLBACK")
    tables = open_db(db_path).execute("SELECT name FROM sqlite_master WHERE name = '_gw_queue'")
    assert tables.fetchall() == []


def test_failed_item_waits_its_backoff_without_blocking_others(
    db: sqlite3.Connection, queue: QueueStore
) -> None:
    with turn(db):
        flaky = queue.push("upload", now=T0)
        queue.push("blink", now=T0)
    with turn(db):
        decision = queue.mark_failed(flaky.id, "broker away", T0)
    # Default policy: 1 s base, full jitter pinned at 0.5 -> 0.5 * min(2 * 1 s, 30 s).
    assert decision is not None and decision.retry_at == pytest.approx(T0 + 1.0)
    assert queue.next_ready_at() == T0
    assert drain(db, queue, T0) == ["blink"]
    assert queue.next_pending(T0 + 0.5) is None
    assert queue.next_ready_at() == pytest.approx(T0 + 1.0)
    item = queue.next_pending(T0 + 1.0)
    assert item is not None and item.id == flaky.id
    assert (item.attempts, item.last_error) == (1, "broker away")
    # Without `now` the oldest pending item is returned regardless of backoff.
    assert queue.next_pending() == item


def test_dead_letter_is_kept_visible_and_never_blocks(
    db: sqlite3.Connection, queue: QueueStore
) -> None:
    with turn(db):
        poison = queue.push("parse", {"raw": "%%"}, retry=RetryPolicy(max_attempts=2), now=T0)
        fine = queue.push("parse", {"raw": "21.5"}, now=T0)
    with turn(db):
        first = queue.mark_failed(poison.id, "bad number '%%'", T0)
        last = queue.mark_failed(poison.id, "bad number '%%' again", T0 + 1)
    assert first is not None and not first.gave_up
    assert last is not None and last.gave_up and last.attempts == 2
    dead = queue.dead_letters()
    assert [(d.id, d.status, d.last_error, d.dead_at) for d in dead] == [
        (poison.id, "dead", "bad number '%%' again", T0 + 1)
    ]
    assert queue.next_pending() == queue.get(fine.id)
    assert queue.next_pending(T0 + 1000) == queue.get(fine.id)
    assert [i.id for i in queue.list()] == [fine.id]
    assert [i.id for i in queue.list(status=None)] == [poison.id, fine.id]
    assert queue.next_ready_at() == T0
    assert drain(db, queue, T0 + 2) == ["parse"]
    assert queue.next_pending() is None and queue.next_ready_at() is None
    assert queue.dead_letters()[0].id == poison.id


def test_requeue_moves_a_dead_letter_to_the_back_with_fresh_attempts(
    db: sqlite3.Connection, queue: QueueStore
) -> None:
    with turn(db):
        poison = queue.push("parse", retry=RetryPolicy(max_attempts=1), now=T0)
        queue.mark_failed(poison.id, "boom", T0)
        later = queue.push("later", now=T0 + 1)
    with turn(db):
        assert not queue.requeue(later.id), "pending items are not requeued"
        assert queue.requeue(poison.id, now=T0 + 5)
        assert not queue.requeue("missing")
    revived = queue.get(poison.id)
    assert revived is not None
    assert (revived.status, revived.attempts, revived.dead_at, revived.ready_at) == (
        "pending",
        0,
        None,
        T0 + 5,
    )
    assert [i.id for i in queue.list()] == [later.id, poison.id]
    assert revived.retry == RetryPolicy(max_attempts=1)


def test_default_policy_dead_letters_after_three_attempts(
    db: sqlite3.Connection, queue: QueueStore
) -> None:
    with turn(db):
        item = queue.push("always_fails", now=T0)
        decisions = [queue.mark_failed(item.id, f"e{n}", T0 + n) for n in range(3)]
    assert DEFAULT_QUEUE_RETRY.max_attempts == 3
    assert [d.gave_up for d in decisions if d is not None] == [False, False, True]


def test_remove_and_mark_done_report_whether_something_was_there(
    db: sqlite3.Connection, queue: QueueStore
) -> None:
    with turn(db):
        item = queue.push("beep", now=T0)
        assert queue.remove(item.id)
        assert not queue.remove(item.id)
        assert not queue.mark_done(item.id)
        assert queue.mark_failed(item.id, "gone", T0) is None
    assert queue.list(status=None) == []


def test_list_filters_by_method_and_rejects_unknown_status(
    db: sqlite3.Connection, queue: QueueStore
) -> None:
    with turn(db):
        a = queue.push("a", now=T0)
        queue.push("b", now=T0)
        a2 = queue.push("a", now=T0)
    assert [i.id for i in queue.list(method="a")] == [a.id, a2.id]
    with pytest.raises(QueueError, match="unknown status 'done'"):
        queue.list(status="done")


def test_bad_input_is_rejected_without_writing(queue: QueueStore) -> None:
    with pytest.raises(PayloadError, match="queue beep: payload must be JSON-serializable"):
        queue.push("beep", {1, 2}, now=T0)
    with pytest.raises(QueueError, match="queue: method must be an identifier"):
        queue.push("rm -rf", now=T0)
    with pytest.raises(QueueError, match="now must be finite"):
        queue.push("beep", now=float("nan"))
    with pytest.raises(QueueError, match="RetryPolicy"):
        queue.push("beep", retry=3, now=T0)  # type: ignore[arg-type]
    assert queue.list(status=None) == []


def test_works_with_a_row_factory_set(db: sqlite3.Connection) -> None:
    db.row_factory = sqlite3.Row
    with turn(db):
        queue = QueueStore(db)
        item = queue.push("beep", [1], now=T0)
    assert queue.next_pending() == item
    assert queue.next_ready_at() == T0
