"""A bare agent database and turn transaction for testing the storage-level stores (schedules,
queue) without the runtime: the test plays the runtime and owns BEGIN/COMMIT."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    return db


@contextmanager
def turn(db: sqlite3.Connection) -> Iterator[None]:
    """One agent turn: the runtime owns the transaction, the store must not end it."""
    db.execute("BEGIN")
    yield
    assert db.in_transaction, "the store ended the turn's transaction"
    db.execute("COMMIT")
