"""Dead letters: inbound messages given up on after their turn failed too many times.

A poison message (one whose turn keeps failing) must neither be retried forever, holding a
pending slot, nor vanish. The MQTT bridge writes it here (topic, payload, QoS, last error,
attempts, first and last failure time) and only then acknowledges it to the broker. An
operator lists the rows and replays them (`gatewayd dead-letters list|replay`), which
republishes each to its original topic and deletes the row once the broker acknowledged it.

One SQLite file (WAL, `synchronous=FULL`: a row must be on disk before its message is acked),
created on the first dead letter. Every method is blocking and opens its own connection, so
it may run in a worker thread (`asyncio.to_thread`) while another process (the CLI) reads.
Standard library only; never imports `gatewayd`.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BUSY_TIMEOUT_MS = 5_000  # the daemon and the CLI may touch the file at the same time

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_failed_at REAL NOT NULL,
    last_failed_at REAL NOT NULL
)
"""
_COLUMNS = "id, topic, payload, qos, error, attempts, first_failed_at, last_failed_at"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One given-up message; times are Unix seconds."""

    id: int
    topic: str
    payload: bytes
    qos: int
    error: str
    attempts: int
    first_failed_at: float
    last_failed_at: float


class DeadLetterStore:
    """The dead-letter table in the SQLite file at `path`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def add(
        self,
        *,
        topic: str,
        payload: bytes,
        qos: int,
        error: str,
        attempts: int,
        first_failed_at: float,
        last_failed_at: float,
    ) -> int:
        """Store one message durably; returns its id."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO dead_letters (topic, payload, qos, error, attempts, "
                "first_failed_at, last_failed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, error, attempts, first_failed_at, last_failed_at),
            )
            row_id = cursor.lastrowid
        db.close()
        assert row_id is not None
        return row_id

    def list(self, ids: Iterable[int] | None = None) -> list[DeadLetter]:
        """All rows (or those with the given ids), oldest first; [] when there is no file."""
        if not self.path.exists():
            return []
        wanted = None if ids is None else sorted(set(ids))
        with self._connect() as db:
            if wanted is None:
                rows = db.execute(f"SELECT {_COLUMNS} FROM dead_letters ORDER BY id").fetchall()
            else:
                marks = ",".join("?" * len(wanted))
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM dead_letters WHERE id IN ({marks}) ORDER BY id",
                    wanted,
                ).fetchall()
        db.close()
        return [DeadLetter(r[0], r[1], bytes(r[2]), *r[3:]) for r in rows]

    def delete(self, row_id: int) -> bool:
        """Remove one row (after its replay was acknowledged); False if it was not there."""
        if not self.path.exists():
            return False
        with self._connect() as db:
            deleted = db.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,)).rowcount
        db.close()
        return deleted > 0

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(_SCHEMA)
        return db
