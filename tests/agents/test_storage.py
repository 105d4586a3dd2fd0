"""Per-agent SQLite files: safe names, caps, value guard, connection state limits."""

from __future__ import annotations

import pytest

from gatewayd.agents import Agent, StorageFullError, ValueTooLargeError, callable
from gatewayd.agents.storage import AgentDatabase, agent_db_file, agent_db_path
from tests.agents.conftest import MemoryLink

WEIRD_IDS = [
    "../../etc/passwd",
    "a/b",
    "a\\b",
    "..",
    "日本語-センサー",
    "x" * 900,
    "a\x00b",
    " ",
    "A",
    "a",
]


class Blobs(Agent):
    def on_start(self):
        self.sql("CREATE TABLE IF NOT EXISTS blobs (data BLOB)")

    @callable
    def put(self, size: int, as_text: bool = False):
        value = "x" * size if as_text else b"\x01" * size
        self.sql("INSERT INTO blobs (data) VALUES (?)", value)
        return size

    @callable
    def count(self):
        return self.sql("SELECT count(*) AS n FROM blobs")[0]["n"]

    @callable
    def big_state(self, size: int):
        self.set_state({"blob": "y" * size})


def test_file_names_are_safe_distinct_and_contained(tmp_path):
    paths = {agent_db_path(tmp_path, "cls", agent_id) for agent_id in WEIRD_IDS}
    assert len(paths) == len(WEIRD_IDS)  # "A" and "a" too (case-insensitive file systems)
    assert len({p.name.lower() for p in paths}) == len(WEIRD_IDS)
    root = (tmp_path / "agents" / "cls").resolve()
    for path in paths:
        assert path.resolve().is_relative_to(root)
        assert "\x00" not in str(path) and len(path.name) < 120
    with pytest.raises(ValueError, match="class name"):
        agent_db_path(tmp_path, "../x", "id")
    with pytest.raises(ValueError, match="UTF-8"):
        agent_db_path(tmp_path, "cls", "bad\udcff")


def test_file_names_never_change(tmp_path):
    """An agent finds its data by its file name: these are the names existing files have."""
    assert agent_db_file("/s", "cls", "device-0042") == (
        "/s/agents/cls/ip/device-0042.ip2y2wq6mg3uuj4yaxabfcoi73piaudo.sqlite3"
    )
    assert agent_db_file("/s", "cls", "日本語-センサー") == (
        "/s/agents/cls/yj/___-____.yjk74hgn3xx4shfs6iuuqathp45tcghm.sqlite3"
    )
    assert agent_db_file("/s", "cls", "../../etc/passwd") == (
        "/s/agents/cls/g5/______etc_passwd.g5knnsz2hdqrqxs3hawv6pxt6emk65n7.sqlite3"
    )


def test_file_names_come_from_a_bounded_cache_that_keeps_refusing_bad_names():
    """`agent_db_file` remembers recent names (a wake skips the hashing): the same answer as
    computing it, repeated calls hit the cache, and a refused name is refused every time."""
    from gatewayd.agents import storage

    storage._agent_db_file_cached.cache_clear()
    first = agent_db_file("/s", "cls", "device-0042")
    assert agent_db_file("/s", "cls", "device-0042") == first
    assert first == storage._agent_db_file("/s", "cls", "device-0042")
    assert storage._agent_db_file_cached.cache_info().hits == 1
    assert storage._agent_db_file_cached.cache_info().maxsize == storage._DB_FILES_CACHED
    for _ in range(2):
        with pytest.raises(ValueError, match="class name"):
            agent_db_file("/s", "../x", "id")
        with pytest.raises(ValueError, match="UTF-8"):
            agent_db_file("/s", "cls", "bad\udcff")
    with pytest.raises(ValueError, match="must be a str"):
        agent_db_file("/s", "cls", 42)  # type: ignore[arg-type]


async def test_weird_ids_each_get_their_own_database(make_runtime, tmp_path):
    async with make_runtime({"blobs": Blobs}) as rt:
        for i, agent_id in enumerate(WEIRD_IDS):
            for _ in range(i + 1):
                await rt.call("blobs", agent_id, "put", 1)
        for i, agent_id in enumerate(WEIRD_IDS):
            assert await rt.call("blobs", agent_id, "count") == i + 1
    files = list((tmp_path / "state" / "agents" / "blobs").rglob("*.sqlite3"))
    assert len(files) == len(WEIRD_IDS)


async def test_opening_a_file_of_another_agent_is_refused(tmp_path):
    db = AgentDatabase.open(
        tmp_path, "c", "one", durability="normal", max_db_bytes=1 << 20, max_value_bytes=100
    )
    assert not db.in_transaction_  # "normal" commits a new file's schema inside open()
    db.close()
    # Simulate a hash collision: the file for "two" is the file of "one".
    two = agent_db_path(tmp_path, "c", "two")
    two.parent.mkdir(parents=True, exist_ok=True)
    two.write_bytes(agent_db_path(tmp_path, "c", "one").read_bytes())
    from gatewayd.agents import StorageError

    with pytest.raises(StorageError, match="belongs to agent c/'one'"):
        AgentDatabase.open(
            tmp_path, "c", "two", durability="normal", max_db_bytes=1 << 20, max_value_bytes=100
        )


async def test_values_over_the_limit_fail_the_turn_clearly(make_runtime):
    async with make_runtime({"blobs": Blobs}) as rt:
        assert await rt.call("blobs", "v", "put", 2_000_000) == 2_000_000
        with pytest.raises(ValueTooLargeError, match="2000001 bytes exceeds the 2000000-byte"):
            await rt.call("blobs", "v", "put", 2_000_001)
        with pytest.raises(ValueTooLargeError, match="text value"):
            await rt.call("blobs", "v", "put", 2_000_001, True)
        with pytest.raises(ValueTooLargeError, match="set_state"):
            await rt.call("blobs", "v", "big_state", 2_000_000)
        assert await rt.call("blobs", "v", "count") == 1


async def test_database_size_cap(make_runtime):
    async with make_runtime({"blobs": Blobs}, max_db_bytes=256 * 1024) as rt:
        with pytest.raises(StorageFullError, match=r"agents\.max_db_size"):
            for _ in range(100):
                await rt.call("blobs", "cap", "put", 50_000)
        count = await rt.call("blobs", "cap", "count")
        assert 0 < count < 100
        await rt.call("blobs", "cap", "put", 10)  # small writes may still fit; agent works


class ConnState(Agent):
    def on_message(self, conn, message):
        if message == "big":
            conn.set_state({"x": "z" * 20_000})
        elif message == "fail":
            conn.set_state({"n": -1})
            raise RuntimeError("after conn.set_state")
        else:
            conn.set_state({"n": (conn.state or {}).get("n", 0) + 1})
        conn.send(str(conn.state))


async def test_connection_state_limit_and_rollback(make_runtime):
    async with make_runtime({"cs": ConnState}) as rt:
        link = MemoryLink("cs", "1", transport="tcp")
        await rt.open_link(link, {})
        await rt.submit_message(link, "inc")
        with pytest.raises(ValueTooLargeError, match="max_connection_state_bytes=16384"):
            await rt.submit_message(link, "big")
        with pytest.raises(RuntimeError):
            await rt.submit_message(link, "fail")
        await rt.submit_message(link, "inc")
        assert link.plain() == ["{'n': 1}", "{'n': 2}"]


def _wal_checkpoint_sequence(path: str) -> int:
    """The WAL header's checkpoint sequence number: +1 each time a writer restarts the WAL."""
    with open(path + "-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def test_normal_durability_starts_the_wal_in_open_and_restarts_it_in_checkpoint(tmp_path):
    # No fsync may run in a COMMIT on the loop with durability="normal": SQLite's automatic
    # checkpoint is off, and the WAL (whose header a restarting writer syncs) is (re)started by
    # open() and checkpoint(), which the runtime runs on its executor.
    from gatewayd.agents.storage import CHECKPOINT_AFTER_COMMITS

    db = AgentDatabase.open(
        tmp_path, "c", "w", durability="normal", max_db_bytes=1 << 20, max_value_bytes=100
    )
    try:
        assert db.connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert not db.commit_fsyncs
        sequence = _wal_checkpoint_sequence(db.path)
        db.connection.execute("CREATE TABLE t (i INTEGER)")
        for i in range(CHECKPOINT_AFTER_COMMITS):
            assert not db.needs_checkpoint()
            db.begin()
            db.connection.execute("INSERT INTO t VALUES (?)", (i,))
            db.commit()
        assert db.needs_checkpoint()
        db.checkpoint()
        assert not db.needs_checkpoint()
        # The checkpoint copied the WAL into the database and already restarted the WAL.
        assert _wal_checkpoint_sequence(db.path) == sequence + 1
        db.begin()
        db.connection.execute("INSERT INTO t VALUES (-1)")
        db.commit()
        assert _wal_checkpoint_sequence(db.path) == sequence + 1  # no restart in the COMMIT
        count = db.connection.execute("SELECT count(*) FROM t").fetchone()[0]
        assert count == CHECKPOINT_AFTER_COMMITS + 1
    finally:
        db.close()
    reopened = AgentDatabase.open(
        tmp_path, "c", "w", durability="normal", max_db_bytes=1 << 20, max_value_bytes=100
    )
    try:
        count = reopened.connection.execute("SELECT count(*) FROM t").fetchone()[0]
        assert count == CHECKPOINT_AFTER_COMMITS + 1
    finally:
        reopened.close()


def test_full_durability_keeps_sqlite_checkpointing_inside_the_commit(tmp_path):
    db = AgentDatabase.open(
        tmp_path, "c", "f", durability="full", max_db_bytes=1 << 20, max_value_bytes=100
    )
    try:
        assert db.commit_fsyncs
        assert db.connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        db.commit()  # the new file's schema
        for _ in range(300):
            db.begin()
            db.commit()
        assert not db.needs_checkpoint()
    finally:
        db.close()


def test_open_reads_the_alarm_tables_with_the_identity_once(tmp_path):
    # The wake's "does this agent have schedules or a queue?" comes from open()'s identity
    # read (no statement of its own), once; later questions read the schema as it is then.
    def open_db() -> AgentDatabase:
        return AgentDatabase.open(
            tmp_path, "c", "a", durability="normal", max_db_bytes=1 << 20, max_value_bytes=100
        )

    db = open_db()
    try:
        assert db.take_opened_alarm_tables() is None  # a new file: its schema was just written
        assert db.alarm_tables() == set()
        if not db.in_transaction_:
            db.begin()
        db.connection.execute("CREATE TABLE _gw_queue (id INTEGER PRIMARY KEY)")
        db.commit()
    finally:
        db.close()
    db = open_db()
    try:
        assert db.take_opened_alarm_tables() == {"_gw_queue"}
        assert db.take_opened_alarm_tables() is None  # once
        if not db.in_transaction_:
            db.begin()
        db.connection.execute("CREATE TABLE _gw_schedules (id INTEGER PRIMARY KEY)")
        assert db.alarm_tables() == {"_gw_queue", "_gw_schedules"}
        db.commit()
    finally:
        db.close()
