"""Agent files of schema version 1 (an `AUTOINCREMENT` outbox; state and dedup seqs in tables
of their own) are migrated in place when they are opened: rows, seqs, state and dedup seqs
survive, new seqs stay above every seq the file ever handed out (also after the table empties
and a restart), and a failed migration leaves the file as it was. The old files are written
here the way gatewayd up to schema version 1 wrote them, by a separate process (one variant is
killed before it closes the file, leaving its WAL)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gatewayd.agents import Agent, StorageError
from gatewayd.agents.errors import CorruptDatabaseError
from gatewayd.agents.outbox import OutboxIndex, OutboxStore
from gatewayd.agents.outbox_schema import high_water_mark
from gatewayd.agents.storage import SCHEMA_VERSION, AgentDatabase, agent_db_path
from protocols.link import DeliveredCallback, OutputAddress
from tests.agents.conftest import MemoryLink
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

KEY = ("echo", "old-device")
MQTT = OutputAddress("mqtt", "dev/old-device/down", 1)
TCP = OutputAddress("tcp", "old-device", 0)
# What gatewayd wrote up to schema version 1 (storage.py's schema and outbox.py's table).
V1_FILE = """
import os, sqlite3, sys
path, crash, rows, deleted, payload_bytes = sys.argv[1], sys.argv[2] == "crash", *map(int, sys.argv[3:6])
conn = sqlite3.connect(path, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("BEGIN")
conn.execute("CREATE TABLE IF NOT EXISTS _gw_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
conn.execute("CREATE TABLE IF NOT EXISTS _gw_state (id INTEGER PRIMARY KEY CHECK (id = 0), json TEXT)")
conn.execute("CREATE TABLE IF NOT EXISTS _gw_dedup (stream TEXT PRIMARY KEY, last_seq INTEGER NOT NULL)")
conn.execute("INSERT OR REPLACE INTO _gw_meta (key, value) VALUES ('agent_class', 'echo'), ('agent_id', 'old-device')")
conn.execute("PRAGMA user_version=1")
conn.execute("COMMIT")
conn.execute("BEGIN")
conn.execute('''CREATE TABLE IF NOT EXISTS _gw_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    transport TEXT NOT NULL,
    target TEXT NOT NULL,
    qos INTEGER NOT NULL,
    payload BLOB NOT NULL
)''')
conn.execute("CREATE TABLE r (n INTEGER PRIMARY KEY, body TEXT)")
conn.execute("INSERT INTO _gw_state (id, json) VALUES (0, '{\\"n\\":41}')")
conn.execute("INSERT INTO _gw_dedup (stream, last_seq) VALUES ('tcp:old-device', 1234)")
for n in range(1, rows + 1):
    conn.execute("INSERT INTO r (body) VALUES (?)", ("m%d" % n,))
    transport, target, qos = ("tcp", "old-device", 0) if n % 2 else ("mqtt", "dev/old-device/down", 1)
    conn.execute(
        "INSERT INTO _gw_outbox (transport, target, qos, payload) VALUES (?, ?, ?, ?)",
        (transport, target, qos, b"%d:" % n + b"x" * payload_bytes),
    )
conn.execute("COMMIT")
for n in range(deleted):  # delivered, one transaction each: the newest, the oldest, ...
    end = "min" if n % 2 else "max"
    conn.execute(f"DELETE FROM _gw_outbox WHERE seq = (SELECT {end}(seq) FROM _gw_outbox)")
if crash:
    os._exit(0)  # killed: no checkpoint, the commits are in the WAL only
conn.close()
"""


def _write_v1_file(
    state_dir: Path, *, rows: int, deleted: int, crash: bool = False, payload_bytes: int = 8
) -> Path:
    """An agent file of schema version 1 with `rows` outputs written (seqs 1..rows), of which
    `deleted` were delivered and deleted (alternately the newest and the oldest left)."""
    path = agent_db_path(state_dir, *KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(path), "crash" if crash else "close", str(rows), str(deleted), str(payload_bytes)]
    subprocess.run([sys.executable, "-c", V1_FILE, *argv], check=True, timeout=30)
    return path


def _open(state_dir: Path, durability: str = "normal", **kw: int) -> AgentDatabase:
    kw.setdefault("max_db_bytes", 1 << 26)
    kw.setdefault("max_value_bytes", 1 << 20)
    return AgentDatabase.open(state_dir, *KEY, durability=durability, **kw)  # type: ignore[arg-type]


def _rows(conn: sqlite3.Connection) -> list[tuple[int, str, str, int, bytes]]:
    return conn.execute(
        "SELECT seq, transport, target, qos, payload FROM _gw_outbox ORDER BY seq"
    ).fetchall()


def _outbox_schema(path: Path) -> tuple[int, str, list[Any]]:
    """(user_version, the outbox table's SQL, its sqlite_sequence rows) read from the file."""
    with sqlite3.connect(path) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = '_gw_outbox'").fetchone()
        sequence = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = '_gw_outbox'"
        ).fetchall()
    conn.close()
    return version, sql[0], sequence


def _append(db: AgentDatabase, address: OutputAddress, payload: bytes) -> int:
    db.begin()
    seq = OutboxStore(db.connection).append(address, payload)
    db.commit()
    return seq


def _deliver_all(db: AgentDatabase) -> None:
    store = OutboxStore(db.connection)
    db.begin()
    store.delete([row.seq for row in store.pending()])
    db.commit()
    assert store.count() == 0


@pytest.mark.parametrize(
    ("durability", "crash"), [("normal", False), ("normal", True), ("full", False)]
)
def test_a_version_1_file_is_migrated_in_place_and_keeps_its_rows_and_seqs(
    tmp_path: Path, durability: str, crash: bool
) -> None:
    # Seqs 1..8 written; 8, 1, 7 delivered: rows 2..6 left, sqlite_sequence says 8.
    path = _write_v1_file(tmp_path, rows=8, deleted=3, crash=crash)
    if crash:
        assert Path(f"{path}-wal").stat().st_size > 32  # the old process's commits: WAL only
    version, sql, sequence = _outbox_schema(path)
    assert (version, "AUTOINCREMENT" in sql, sequence) == (1, True, [(8,)])
    with sqlite3.connect(path) as conn:
        before = _rows(conn)
    conn.close()
    assert [row[0] for row in before] == [2, 3, 4, 5, 6]

    db = _open(tmp_path, durability)
    try:
        assert _rows(db.connection) == before  # every row, same seq, address and payload
        assert [row.seq for row in OutboxStore(db.connection).pending()] == [2, 3, 4, 5, 6]
        assert db.load_state() == (True, {"n": 41})
        assert db.last_seq("tcp:old-device") == 1234
        assert db.sql("SELECT count(*) AS n FROM r", ()) == [{"n": 8}]
        # Above 8, the highest seq the old file handed out (its row is gone).
        assert _append(db, TCP, b"new") == 9
        _deliver_all(db)  # the table empties
        assert _append(db, MQTT, b"after empty") == 10
        _deliver_all(db)
    finally:
        db.close()
    version, sql, sequence = _outbox_schema(path)
    assert (version, "AUTOINCREMENT" in sql, sequence) == (SCHEMA_VERSION, False, [])
    with sqlite3.connect(path) as conn:  # state and dedup seqs: rows of one table now
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "_gw_turn_rows" in tables and not tables & {"_gw_state", "_gw_dedup"}

    db = _open(tmp_path, durability)  # a restart, with the table empty
    try:
        assert OutboxStore(db.connection).count() == 0
        assert _append(db, TCP, b"after restart") == 11
        assert high_water_mark(db.connection) == 11
    finally:
        db.close()


def test_an_empty_version_1_outbox_keeps_its_sequence(tmp_path: Path) -> None:
    path = _write_v1_file(tmp_path, rows=5, deleted=5)
    assert _outbox_schema(path)[2] == [(5,)]  # no row left, only sqlite_sequence knows
    db = _open(tmp_path)
    try:
        assert OutboxStore(db.connection).count() == 0
        assert _append(db, TCP, b"first after the upgrade") == 6
    finally:
        db.close()


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    # 40 rows of 2 KB: copying them needs pages the cap does not allow (SQLITE_FULL).
    path = _write_v1_file(tmp_path, rows=40, deleted=2, payload_bytes=2000)
    with sqlite3.connect(path) as conn:
        before = _rows(conn)
    conn.close()
    with pytest.raises(StorageError, match=r"cannot initialise .*full"):
        _open(tmp_path, max_db_bytes=4096)  # below the file's size: no page may be added
    version, sql, sequence = _outbox_schema(path)
    assert (version, "AUTOINCREMENT" in sql, sequence) == (1, True, [(40,)])
    with sqlite3.connect(path) as conn:
        assert _rows(conn) == before
    conn.close()
    db = _open(tmp_path)  # with room, the next open migrates it
    try:
        assert _rows(db.connection) == before
        assert _append(db, TCP, b"new") == 41
    finally:
        db.close()
    assert _outbox_schema(path)[0] == SCHEMA_VERSION


def test_a_file_of_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    db = _open(tmp_path)
    db.close()
    path = agent_db_path(tmp_path, *KEY)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(CorruptDatabaseError, match=f"schema version {SCHEMA_VERSION + 1}"):
        _open(tmp_path)


class Echo(Agent):
    initial_state: ClassVar[dict[str, int]] = {"n": 0}

    def on_message(self, conn: Any, message: bytes | str) -> None:
        self.set_state({"n": self.state["n"] + 1})
        conn.send(b"ack")


class RecordingOutputs:
    """A durable-outputs transport: records (seq, payload) and delivers right away."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.sent: list[tuple[int, bytes]] = []

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None:
        self.sent.append((seq, payload))
        asyncio.get_running_loop().call_soon(on_delivered, seq)


class DeviceLink(MemoryLink):
    def __init__(self, outputs: RecordingOutputs) -> None:
        super().__init__(*KEY, transport="tcp")
        self.outputs = outputs
        self.output_address = TCP


async def test_an_upgraded_gateway_resends_old_rows_and_numbers_new_ones_above_them(
    make_runtime, tmp_path: Path
) -> None:
    """The old gateway was killed with undelivered outputs (rows 2..6, seq 8 handed out): the
    new one sends those with their seqs (a TCP device compares push seqs with the last it
    applied), then numbers its own above 8."""
    state_dir = tmp_path / "state"
    _write_v1_file(state_dir, rows=8, deleted=3, crash=True)
    index = OutboxIndex(state_dir / "outbox-index.sqlite3")
    index.mark(KEY)
    index.close()
    tcp, mqtt = RecordingOutputs("tcp"), RecordingOutputs("mqtt")
    async with make_runtime({"echo": Echo}) as rt:
        rt.attach_outputs(mqtt)
        rt.attach_outputs(tcp)
        link = DeviceLink(tcp)
        await rt.open_link(link, {})
        await rt.submit_message(link, b"hello")
        await wait_until(lambda: len(tcp.sent) + len(mqtt.sent) == 6, 5, "old rows and reply")
    assert [seq for seq, _ in tcp.sent] == [3, 5, 9] and tcp.sent[-1][1] == b"ack"
    assert [seq for seq, _ in mqtt.sent] == [2, 4, 6]
    assert [payload.split(b":")[0] for _, payload in mqtt.sent] == [b"2", b"4", b"6"]
