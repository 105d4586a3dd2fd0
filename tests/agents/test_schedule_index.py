"""Tests for gatewayd/agents/schedule_index.py: a real SQLite file, WAL, survives reopening;
plus the runtime's intended use with real per-agent schedule and queue stores."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gatewayd.agents.queue import QueueStore
from gatewayd.agents.schedule_index import DueAgent, ScheduleIndex, ScheduleIndexClosedError
from gatewayd.agents.schedules import ScheduleStore

T0 = 1_800_000_000.0


@pytest.fixture
def index_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "schedule-index.sqlite3"


@pytest.fixture
def index(index_path: Path):  # type: ignore[no-untyped-def]
    index_path.parent.mkdir()
    with ScheduleIndex(index_path) as opened:
        yield opened


def test_due_and_next_wake_order_by_time(index: ScheduleIndex) -> None:
    assert index.next_wake_at() is None and index.due(T0) == []
    index.set_next("thermostat", "kitchen", T0 + 30)
    index.set_next("thermostat", "attic", T0 + 10)
    index.set_next("pump", "7", T0 + 20)
    assert index.next_wake_at() == T0 + 10
    assert index.due(T0 + 20) == [
        DueAgent("thermostat", "attic", T0 + 10),
        DueAgent("pump", "7", T0 + 20),
    ]
    assert index.due(T0 + 100, limit=1) == [("thermostat", "attic", T0 + 10)]
    assert index.due(T0 + 9) == []
    assert len(index) == 3


def test_set_next_updates_and_none_removes(index: ScheduleIndex) -> None:
    index.set_next("thermostat", "kitchen", T0 + 30)
    index.set_next("thermostat", "kitchen", T0 + 5)
    assert index.get("thermostat", "kitchen") == T0 + 5
    assert len(index) == 1
    index.set_next("thermostat", "kitchen", None)
    assert index.get("thermostat", "kitchen") is None
    assert index.next_wake_at() is None
    index.set_next("thermostat", "never-added", None)  # removing nothing is fine
    assert len(index) == 0


def test_survives_reopening_and_uses_wal(index_path: Path) -> None:
    index_path.parent.mkdir()
    first = ScheduleIndex(index_path)
    first.set_next("sensor", "ünïcödé/../id", T0)
    first.close()
    first.close()  # idempotent
    with ScheduleIndex(index_path) as second:
        assert second.due(T0) == [("sensor", "ünïcödé/../id", T0)]
    raw = sqlite3.connect(index_path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_set_many_is_all_or_nothing(index: ScheduleIndex) -> None:
    index.set_next("a", "1", T0)
    index.set_many([("a", "1", None), ("b", "2", T0 + 1), ("c", "3", T0 + 2)])
    assert index.due(T0 + 10) == [("b", "2", T0 + 1), ("c", "3", T0 + 2)]
    with pytest.raises(ValueError, match="next_due_at for d:4 must be finite"):
        index.set_many([("b", "2", None), ("d", "4", float("nan"))])
    assert len(index) == 2


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (("", "x", T0), "agent_class"),
        ((None, "x", T0), "agent_class"),
        (("a", 5, T0), "agent_id"),
        (("a", "x", "soon"), "next_due_at"),
        (("a", "x", True), "next_due_at"),
        (("a", "x", float("inf")), "next_due_at"),
    ],
)
def test_invalid_entries_are_rejected(index: ScheduleIndex, entry: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        index.set_next(*entry)
    assert len(index) == 0


def test_use_after_close_is_a_clear_error(index_path: Path) -> None:
    index_path.parent.mkdir()
    index = ScheduleIndex(index_path)
    index.close()
    with pytest.raises(ScheduleIndexClosedError, match="used after close"):
        index.next_wake_at()


async def test_can_be_called_from_a_worker_thread(index: ScheduleIndex) -> None:
    await asyncio.gather(
        *(asyncio.to_thread(index.set_next, "agent", str(n), T0 + n) for n in range(20))
    )
    assert len(index) == 20
    assert await asyncio.to_thread(index.next_wake_at) == T0


def test_runtime_flow_keeps_the_index_in_step_with_agent_databases(
    tmp_path: Path, index: ScheduleIndex
) -> None:
    """Commit the agent's turn first, then set_next with the earliest of schedules and queue."""

    def commit_turn_and_index(agent_id: str, db: sqlite3.Connection) -> None:
        db.execute("COMMIT")
        schedules, queue = ScheduleStore(db), QueueStore(db)
        candidates = [t for t in (schedules.next_due_at(), queue.next_ready_at()) if t is not None]
        index.set_next("thermostat", agent_id, min(candidates) if candidates else None)

    dbs = {}
    for agent_id, delay_s in (("kitchen", 60), ("attic", 5)):
        db = sqlite3.connect(tmp_path / f"{agent_id}.sqlite3", isolation_level=None)
        db.execute("BEGIN")
        ScheduleStore(db).add(delay_s, "poll", now=T0)
        QueueStore(db)
        commit_turn_and_index(agent_id, db)
        dbs[agent_id] = db

    # "Restart": only the index is read to find who to wake.
    assert [d.agent_id for d in index.due(T0 + 5)] == ["attic"]
    attic = dbs["attic"]
    attic.execute("BEGIN")
    schedules = ScheduleStore(attic)
    [due] = schedules.due(T0 + 5)
    schedules.mark_done(due.id, T0 + 5)
    QueueStore(attic).push("report", now=T0 + 5)  # e.g. the handler enqueued follow-up work
    commit_turn_and_index("attic", attic)
    assert index.get("thermostat", "attic") == T0 + 5

    attic.execute("BEGIN")
    queue = QueueStore(attic)
    item = queue.next_pending(T0 + 5)
    assert item is not None
    queue.mark_done(item.id)
    commit_turn_and_index("attic", attic)
    assert index.get("thermostat", "attic") is None
    assert index.next_wake_at() == T0 + 60
    for db in dbs.values():
        db.close()
