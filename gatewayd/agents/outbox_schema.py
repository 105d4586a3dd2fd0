"""The `_gw_outbox` table of an agent's file: how its row seqs stay unique, and its migration.

A row's `seq` (its rowid) orders one agent's outputs, is the TCP push seq (protocols/FRAMES.md
section 6: a device applies a push only if its seq is above the last one it applied) and, in
cluster mode, names the reply's JetStream message (`Nats-Msg-Id: <subject>/<seq>`, deduplicated
by the stream). So a seq is never handed out twice for the life of the file, even after its row
was deleted: a reused seq would be skipped by the device or dropped as a duplicate.

Up to schema version 1 the table was `AUTOINCREMENT`, which keeps that promise by rewriting its
row of `sqlite_sequence` in every transaction that inserts: one page (one WAL frame) of the ~4 a
reply's commit writes. Since version 2 the table is a plain rowid table and:

- an insert takes seq = 1 + max(the table's highest seq, the high-water mark), computed by the
  INSERT itself (two b-tree seeks; nothing else written);
- a delete never removes the table's highest row by itself (`DELETE_BELOW_HIGHEST`: the guard
  is one seek, evaluated once per statement). When that row was among the seqs to delete
  (fewer rows went than asked), the caller raises the high-water mark (the `outbox_high_seq`
  row of `_gw_meta`, which every agent file has) to the highest seq it deletes and then
  deletes the rest (`RAISE_HIGH`, `DELETE_ANY`).
  The runtime deletes delivered rows after the batch's turns wrote theirs, so an agent that
  keeps replying never deletes its highest row and never writes the mark; an agent whose
  outputs have all gone pays that one page in the commit that empties the table (usually the
  settle before it hibernates), the page AUTOINCREMENT paid in every commit.

Invariant: every seq ever committed is <= max(highest row, mark): the last row at or above a
seq can only go in a delete that found it the highest, which first raised the mark to at
least its seq; the mark never decreases; both roll back together. So every new seq is above
every seq ever handed out. Rows are deleted only this way (`OutboxStore.delete`). Seqs of rows
whose transaction rolled back may be taken again: those rows never existed, and no output
leaves before its commit.
"""

from __future__ import annotations

import sqlite3

_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    seq INTEGER PRIMARY KEY,
    transport TEXT NOT NULL,
    target TEXT NOT NULL,
    qos INTEGER NOT NULL,
    payload BLOB NOT NULL
)"""
SCHEMA = _TABLE.format(name="_gw_outbox")
"""Creates the table if it is missing: run in the caller's transaction."""

_HIGH_KEY = "outbox_high_seq"  # in _gw_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
_HIGH = (
    "max(ifnull((SELECT max(seq) FROM _gw_outbox), 0), "
    f"ifnull((SELECT CAST(value AS INTEGER) FROM _gw_meta WHERE key = '{_HIGH_KEY}'), 0))"
)
INSERT = (
    "INSERT INTO _gw_outbox (seq, transport, target, qos, payload) "
    f"VALUES ({_HIGH} + 1, ?, ?, ?, ?)"
)
"""Parameters: transport, target, qos, payload; the new seq is the cursor's `lastrowid`."""

_BELOW_HIGHEST = "seq < (SELECT max(seq) FROM _gw_outbox)"
DELETE_BELOW_HIGHEST = (
    f"DELETE FROM _gw_outbox WHERE seq = ? AND {_BELOW_HIGHEST}",
    f"DELETE FROM _gw_outbox WHERE seq BETWEEN ? AND ? AND {_BELOW_HIGHEST}",
)
"""(one seq, a run of seqs low..high): the rows asked for, except the table's highest."""
DELETE_ANY = (
    "DELETE FROM _gw_outbox WHERE seq = ?",
    "DELETE FROM _gw_outbox WHERE seq BETWEEN ? AND ?",
)
"""As `DELETE_BELOW_HIGHEST`, without the guard: only after `RAISE_HIGH`."""
RAISE_HIGH = (
    f"INSERT INTO _gw_meta (key, value) VALUES ('{_HIGH_KEY}', ?) ON CONFLICT (key) DO UPDATE "
    "SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))"
)
"""Parameter: a seq handed out (the highest of the rows about to be deleted)."""


def high_water_mark(conn: sqlite3.Connection) -> int:
    """The highest seq ever handed out in this file (0: none). For tests and tools."""
    return int(conn.execute(f"SELECT {_HIGH}").fetchone()[0])


def migrate_from_autoincrement(conn: sqlite3.Connection) -> bool:
    """Schema version 1 -> 2, in the caller's transaction: rebuild an `AUTOINCREMENT`
    `_gw_outbox` as a plain rowid table with the same rows and seqs, and record the highest
    seq it ever handed out (its `sqlite_sequence` entry, or its highest row) as the high-water
    mark. Returns whether there was such a table (a file without one creates the new table
    when its agent first sends to a device)."""
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = '_gw_outbox'"
    ).fetchone()
    if row is None or "AUTOINCREMENT" not in str(row[0]).upper():
        return False
    (high,) = conn.execute(
        "SELECT max(ifnull((SELECT seq FROM sqlite_sequence WHERE name = '_gw_outbox'), 0), "
        "ifnull((SELECT max(seq) FROM _gw_outbox), 0))"
    ).fetchone()
    # SQLite's documented way to change a table's definition: a new table, the rows copied,
    # the old one dropped (which also removes its sqlite_sequence row), the new one renamed.
    conn.execute(_TABLE.format(name="_gw_outbox_v2"))
    conn.execute(
        "INSERT INTO _gw_outbox_v2 (seq, transport, target, qos, payload) "
        "SELECT seq, transport, target, qos, payload FROM _gw_outbox ORDER BY seq"
    )
    conn.execute("DROP TABLE _gw_outbox")
    conn.execute("ALTER TABLE _gw_outbox_v2 RENAME TO _gw_outbox")
    if high:
        conn.execute(RAISE_HIGH, (int(high),))
    return True
