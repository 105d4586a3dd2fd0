"""A hibernating agent's close keeps a restarted WAL, so its next wake costs no fsync; a WAL
that does not belong to the database file next to it is never replayed."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from gatewayd.agents.storage import AgentDatabase


def _open(state_dir: Path, agent_id: str = "w") -> AgentDatabase:
    return AgentDatabase.open(
        state_dir, "c", agent_id, durability="normal", max_db_bytes=1 << 22, max_value_bytes=100
    )


def _wal_checkpoint_sequence(path: str) -> int:
    """The WAL header's checkpoint sequence number: +1 each time a writer restarts the WAL."""
    with open(path + "-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def _add(db: AgentDatabase, value: int) -> None:
    db.begin()
    db.connection.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER)")
    db.connection.execute("INSERT INTO t VALUES (?)", (value,))
    db.commit()


def _values(db: AgentDatabase) -> list[int]:
    return [row[0] for row in db.connection.execute("SELECT i FROM t ORDER BY i")]


def test_close_restarts_the_wal_and_the_next_open_only_appends(tmp_path: Path) -> None:
    db = _open(tmp_path)
    assert db.keeps_wal
    _add(db, 1)
    path = db.path
    before = _wal_checkpoint_sequence(path)
    db.close()
    # The close checkpointed and restarted the WAL (the restart is the one that fsyncs) and
    # left it, small, on disk.
    assert _wal_checkpoint_sequence(path) == before + 1
    assert 0 < os.path.getsize(path + "-wal") <= 64 * 1024
    reopened = _open(tmp_path)
    try:
        # Opening appended to that WAL: no restart, so no header fsync on the wake.
        assert _wal_checkpoint_sequence(path) == before + 1
        assert _values(reopened) == [1]
        _add(reopened, 2)
    finally:
        reopened.close()
    # Plain SQLite (no kept-WAL settings) reads everything committed.
    with sqlite3.connect(path) as plain:
        assert [r[0] for r in plain.execute("SELECT i FROM t ORDER BY i")] == [1, 2]
        assert plain.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_wal_left_by_an_earlier_copy_of_the_file_is_set_aside(tmp_path: Path) -> None:
    db = _open(tmp_path)
    _add(db, 1)
    path = db.path
    db.close()
    backup = tmp_path / "backup.sqlite3"
    shutil.copyfile(path, backup)  # the database file alone, as an operator would back it up
    db = _open(tmp_path)
    _add(db, 2)
    _add(db, 3)
    db.close()
    # The backup is restored over the file (a new inode); the kept WAL is the later file's.
    os.replace(backup, path)
    # Not on the loop (setting the WAL aside is the executor's job), and nothing changed.
    warm = AgentDatabase.open_if_warm(
        tmp_path, "c", "w", durability="normal", max_db_bytes=1 << 22, max_value_bytes=100
    )
    assert warm is None
    assert not os.path.exists(path + "-wal.stale")
    restored = _open(tmp_path)
    try:
        assert os.path.exists(path + "-wal.stale")
        assert restored.connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # The backup's rows (the close before it checkpointed row 1 into the file), not the
        # later file's rows 2 and 3 from its WAL.
        assert _values(restored) == [1]
        _add(restored, 4)
        assert _values(restored)[-1] == 4
    finally:
        restored.close()


def test_a_wal_without_its_database_file_is_not_replayed_into_a_new_one(tmp_path: Path) -> None:
    db = _open(tmp_path)
    _add(db, 1)
    path = db.path
    db.close()
    os.unlink(path)  # moved aside without its -wal and -shm
    assert os.path.exists(path + "-wal")
    fresh = _open(tmp_path)
    try:
        assert fresh.connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = fresh.connection.execute("SELECT name FROM sqlite_master WHERE name = 't'")
        assert tables.fetchall() == []
    finally:
        fresh.close()


def test_a_record_checkpointed_into_the_file_by_another_connection_is_not_a_stale_wal(
    tmp_path: Path,
) -> None:
    # A plain connection (the runtime settles delivered outputs of a hibernated agent with
    # one) checkpoints the kept WAL, record included, into the file and deletes the WAL; the
    # file then grows: the record no longer matches, but there is no WAL to distrust.
    db = _open(tmp_path)
    _add(db, 1)
    path = db.path
    db.close()
    with sqlite3.connect(path, isolation_level=None) as plain:
        plain.execute("BEGIN")
        plain.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(2, 2000)])
        plain.execute("COMMIT")
    plain.close()
    assert not os.path.exists(path + "-wal")
    reopened = _open(tmp_path)
    try:
        assert not os.path.exists(path + "-wal.stale")
        assert _values(reopened) == list(range(1, 2000))
        record = "SELECT count(*) FROM _gw_meta WHERE key = 'wal_for_file'"
        assert reopened.connection.execute(record).fetchone()[0] == 0  # forgotten on open
    finally:
        reopened.close()


def test_a_wake_whose_first_transaction_rolls_back_still_forgets_the_record(
    tmp_path: Path,
) -> None:
    """The ownership record is forgotten by every transaction of a woken database until one
    commits, as part of its BEGIN: the first turn needs no savepoint, and undoing it (ROLLBACK,
    BEGIN) does not bring the record back into what the next COMMIT makes durable."""
    db = _open(tmp_path)
    _add(db, 1)
    db.close()
    record = "SELECT count(*) FROM _gw_meta WHERE key = 'wal_for_file'"
    reopened = _open(tmp_path)
    try:
        assert reopened.connection.in_transaction
        assert reopened.connection.execute(record).fetchone()[0] == 0
        assert reopened.turn_savepoint() is False  # nothing of a turn changed yet
        reopened.undo_turn(False)  # the first turn failed: ROLLBACK, BEGIN
        assert reopened.connection.execute(record).fetchone()[0] == 0
        reopened.connection.execute("INSERT INTO t VALUES (2)")
        reopened.commit()
        with sqlite3.connect(reopened.path) as other:
            assert other.execute(record).fetchone()[0] == 0
        _add(reopened, 3)
        assert _values(reopened) == [1, 2, 3]
    finally:
        reopened.close()
