"""`LoopScheduleIndex`: the schedule index as the event loop uses it. Writes are recorded on
the loop and applied on the index's own thread; a read sees every update recorded before it;
close() writes what is still recorded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gatewayd.agents.schedule_index import DueAgent, LoopScheduleIndex, ScheduleIndex

pytestmark = pytest.mark.timeout(30)


async def test_reads_see_every_update_recorded_before_them(tmp_path: Path) -> None:
    index = LoopScheduleIndex(tmp_path / "index.sqlite3", synchronous_full=True)
    try:
        for n in range(100):
            index.set_next("c", f"a{n}", 1000.0 + n)
        index.set_next("c", "a0", None)  # the latest update of a key wins
        index.set_next("c", "a1", 5.0)
        assert await index.next_wake_at() == 5.0
        assert await index.due(1002.0) == [DueAgent("c", "a1", 5.0), DueAgent("c", "a2", 1002.0)]
        assert await index.get("c", "a0") is None
    finally:
        index.close()


async def test_close_writes_what_is_recorded(tmp_path: Path) -> None:
    index = LoopScheduleIndex(tmp_path / "index.sqlite3")
    index.set_next("c", "late", 42.0)
    index.close()  # no await in between: the update was only recorded
    with ScheduleIndex(tmp_path / "index.sqlite3") as reopened:
        assert reopened.get("c", "late") == 42.0


async def test_the_file_is_only_used_on_the_index_thread(tmp_path: Path) -> None:
    index = LoopScheduleIndex(tmp_path / "index.sqlite3", synchronous_full=True)
    threads: set[int] = set()
    # Every statement SQLite runs on the index's connection (writes, reads, checkpoints).
    index._index._open_db().set_trace_callback(lambda _sql: threads.add(threading.get_ident()))
    for n in range(10):
        index.set_next("c", f"a{n}", float(n))
        await index.next_wake_at()
    index.close()
    assert threads and threading.get_ident() not in threads


async def test_invalid_updates_are_refused_on_the_caller(tmp_path: Path) -> None:
    index = LoopScheduleIndex(tmp_path / "index.sqlite3")
    try:
        with pytest.raises(ValueError, match="must be finite epoch seconds"):
            index.set_next("c", "a", float("nan"))
    finally:
        index.close()
