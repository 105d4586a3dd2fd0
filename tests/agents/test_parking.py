"""A hibernating agent's database connection stays open (parked) for a quick wake: the wake
takes it back instead of opening the file, unless the files changed meanwhile; parking never
changes what is on disk, and the number of parked connections is bounded."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import ClassVar

from gatewayd.agents import Agent, callable
from gatewayd.agents.scheduler import PARKED_DATABASES
from gatewayd.agents.storage import AgentDatabase, agent_db_path
from tests.waiting import wait_until


class Counter(Agent):
    initial_state: ClassVar[dict[str, int]] = {"n": 0}

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS hits (i INTEGER)")

    @callable
    def hit(self) -> int:
        n = self.state["n"] + 1
        self.sql("INSERT INTO hits (i) VALUES (?)", n)
        self.set_state({"n": n})
        return n

    @callable
    def rows(self) -> list[int]:
        return [row["i"] for row in self.sql("SELECT i FROM hits ORDER BY i")]


def _parked_wakes(rt) -> int:
    return rt._scheduler.counters.get("parked_wakes_total", 0)


async def _hibernate(rt) -> None:
    rt.hibernate_idle()
    await wait_until(lambda: not rt._scheduler.closing, 10, "the hibernation to finish")


async def test_a_recently_hibernated_agent_wakes_on_its_parked_connection(make_runtime):
    async with make_runtime({"c": Counter}) as rt:
        assert await rt.call("c", "a", "hit") == 1
        await _hibernate(rt)
        assert not rt.is_awake("c", "a")
        assert ("c", "a") in rt._scheduler.parked
        assert await rt.call("c", "a", "hit") == 2
        assert _parked_wakes(rt) == 1
        assert ("c", "a") not in rt._scheduler.parked
        await _hibernate(rt)
        assert await rt.call("c", "a", "rows") == [1, 2]
        assert _parked_wakes(rt) == 2
    # Closed: plain SQLite finds every commit in the file and its WAL.
    path = agent_db_path(rt.settings.state_dir, "c", "a")
    with sqlite3.connect(path) as plain:
        assert [r[0] for r in plain.execute("SELECT i FROM hits ORDER BY i")] == [1, 2]
        assert plain.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_parked_connections_are_bounded_and_the_oldest_close(make_runtime):
    agents = PARKED_DATABASES + 10
    async with make_runtime({"c": Counter}, max_active_agents=agents + 10) as rt:
        for i in range(agents):
            await rt.call("c", f"a{i}", "hit")
        await _hibernate(rt)
        assert len(rt._scheduler.parked) == PARKED_DATABASES
        # The least recently used ones closed; they wake by opening their file.
        assert ("c", "a0") not in rt._scheduler.parked
        assert ("c", f"a{agents - 1}") in rt._scheduler.parked
        assert await rt.call("c", "a0", "hit") == 2
        assert _parked_wakes(rt) == 0
        assert await rt.call("c", f"a{agents - 1}", "hit") == 2
        assert _parked_wakes(rt) == 1
    assert not rt._scheduler.parked


async def test_a_file_restored_while_parked_is_opened_afresh(make_runtime, tmp_path: Path):
    """A backup put back while the agent hibernated: the wake must read the restored file,
    not keep writing through the parked connection into the replaced one."""
    backup = tmp_path / "backup.sqlite3"
    async with make_runtime({"c": Counter}) as rt:
        assert await rt.call("c", "a", "hit") == 1
        await _hibernate(rt)
        path = agent_db_path(rt.settings.state_dir, "c", "a")
        shutil.copyfile(path, backup)  # the closing checkpoint put everything in the file
        assert await rt.call("c", "a", "hit") == 2
        assert await rt.call("c", "a", "hit") == 3
        await _hibernate(rt)
        assert ("c", "a") in rt._scheduler.parked
        parked_wakes = _parked_wakes(rt)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink()
        restored = Path(f"{path}.restoring")
        shutil.copyfile(backup, restored)
        os.replace(restored, path)
        assert await rt.call("c", "a", "rows") == [1]
        assert _parked_wakes(rt) == parked_wakes
        assert await rt.call("c", "a", "hit") == 2


def _open(state_dir: Path) -> AgentDatabase:
    return AgentDatabase.open(
        state_dir, "c", "w", durability="normal", max_db_bytes=1 << 22, max_value_bytes=100
    )


def _add(db: AgentDatabase, value: int) -> None:
    db.begin()
    db.connection.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER)")
    db.connection.execute("INSERT INTO t VALUES (?)", (value,))
    db.commit()


def test_commits_after_a_resume_survive_a_crash_after_a_checkpoint(tmp_path: Path) -> None:
    """Parking writes the WAL-ownership record (like a close); the resume must forget it, or
    a crash after a later checkpoint (which changes the file) would set the WAL aside."""
    db = _open(tmp_path)
    _add(db, 1)
    files = db.park()
    assert files is not None
    assert db.resume(files)
    db.commit()
    _add(db, 2)
    db.begin()
    db.connection.execute("CREATE TABLE g (v TEXT)")
    db.connection.executemany("INSERT INTO g VALUES (?)", [("x" * 90,)] * 200)
    db.commit()
    _add(db, 3)
    size = os.path.getsize(db.path)
    db.checkpoint()  # the file grows: its identity no longer matches a stale record
    assert os.path.getsize(db.path) > size
    _add(db, 4)  # only in the WAL
    path = db.path
    db.close_parked()  # a crash: no checkpoint, the WAL keeps frame 4
    reopened = _open(tmp_path)
    try:
        assert not os.path.exists(path + "-wal.stale")
        rows = [r[0] for r in reopened.connection.execute("SELECT i FROM t ORDER BY i")]
        assert rows == [1, 2, 3, 4]
    finally:
        reopened.close()


def test_a_parked_database_whose_files_changed_is_not_resumed(tmp_path: Path) -> None:
    db = _open(tmp_path)
    _add(db, 1)
    files = db.park()
    assert files is not None
    with sqlite3.connect(db.path) as other:  # another process writes meanwhile
        other.execute("INSERT INTO t VALUES (2)")
    assert not db.resume(files)
    assert not db.in_transaction_
    db.close_parked()
    reopened = _open(tmp_path)
    try:
        assert [r[0] for r in reopened.connection.execute("SELECT i FROM t ORDER BY i")] == [1, 2]
    finally:
        reopened.close()


async def test_a_parked_connection_closes_after_hibernate_after_s(make_runtime):
    async with make_runtime({"c": Counter}, hibernate_after_s=0.2) as rt:
        assert await rt.call("c", "a", "hit") == 1
        # The idle sweeper hibernates it (parked), then closes it after another 0.2 s.
        await wait_until(lambda: ("c", "a") in rt._scheduler.parked, 10, "the agent parked")
        await wait_until(
            lambda: not rt._scheduler.parked and not rt._scheduler.closing,
            10,
            "the parked connection to close",
        )
        assert await rt.call("c", "a", "hit") == 2
        assert _parked_wakes(rt) == 0


async def test_agents_evicted_beyond_max_active_are_closed_not_parked(make_runtime):
    async with make_runtime({"c": Counter}, max_active_agents=2) as rt:
        for i in range(5):
            await rt.call("c", f"a{i}", "hit")
        await wait_until(lambda: not rt._scheduler.closing, 10, "the evictions to finish")
        assert rt.stats()["hibernations_total"] >= 3
        assert not rt._scheduler.parked
        assert await rt.call("c", "a0", "hit") == 2
        assert _parked_wakes(rt) == 0
