"""One SQLite file per agent: safe file names, pragmas, schema, guarded SQL, commit.

The invariant: no fsync ever runs on the event loop thread.

- durability="full": every COMMIT fsyncs, so `commit()` runs on the runtime's small shared
  commit executor (committer.py).
- durability="normal" (WAL, synchronous=NORMAL): a COMMIT only appends to the WAL, so the
  runtime runs `commit()` inline on the loop. The fsyncs of this mode happen (1) inside a
  checkpoint, and (2) when a writer (re)starts the WAL and syncs its header. Both are kept off
  the loop: SQLite's automatic checkpoint is disabled (`wal_autocheckpoint=0`), `open()` (when
  the WAL is not already started, see below) and `checkpoint()` (both executor-only) end with
  a tiny write that (re)starts the WAL there, and
  the runtime calls `checkpoint()` on the executor once `needs_checkpoint()`, at the end of
  that agent's commit path (the agent is busy until it returns), and `close()` (which
  checkpoints) on the executor too.

Wakes: a hibernating agent's `close()` (executor) checkpoints and then restarts the WAL with
the tiny write, and the connection closes without SQLite's own checkpoint and keeps its -wal
and -shm files (keepwal.py). So the WAL is already started when the agent wakes (its first
frame carries the header's salts): `open()` commits nothing of its own then (it leaves a
transaction open that forgets the WAL-ownership record, see below; every transaction does, as
part of its BEGIN, until one committed), the first batch's COMMIT appends to the WAL instead
of restarting it, and a wake costs no fsync (which also lets `open_if_warm` open such a file
on the loop when its pages are in the page cache). A hibernated agent keeps a small WAL (a
few pages; `journal_size_limit` truncates it at the restart) and a 32 KiB -shm file next to
its database. Where keepwal.py cannot apply (see there), closes checkpoint and delete the
files as SQLite does by default and wakes pay the fsync in `open()`.

What a cold open costs (bench/results/agents-wake.md): mostly SQLite's own first read, as for
any first connection to a WAL file: it truncates the -shm file to 3 bytes and extends it again
(eight 1-byte writes) before rebuilding the WAL index from the WAL; on ext4 the truncate frees
the blocks written back since the last open. `open_if_warm` adds one open/fstat/read per file
(`_warm_probe`) and takes from it what the open would otherwise ask SQLite for (page size,
schema version, the file's identity), and the identity read also reads the agent's state.

The runtime guarantees the loop does not touch a database while an executor call on it is in
flight (the agent is busy until then); `_io_lock` additionally serialises the executor-side
`checkpoint()` and `close()` (a runtime shutdown may cancel a turn task mid-checkpoint).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatewayd.agents import keepwal, outbox_schema
from gatewayd.agents.errors import (
    AgentError,
    CorruptDatabaseError,
    StorageError,
    StorageFullError,
    ValueTooLargeError,
)

logger = logging.getLogger(__name__)

# The schema version a new file gets (`PRAGMA user_version`); `open()` migrates older files in
# place, each in one transaction of its own (`_MIGRATIONS`), and refuses newer ones.
SCHEMA_VERSION = 2
# Only our own process opens an agent file; a short wait covers a close still checkpointing.
_BUSY_TIMEOUT_S = 5.0
# SQLite's page cache per open agent database. Its default (2 MiB) times `max_active` awake
# agents (10,000) would be 20 GB, and each cache keeps growing with its agent's tables, so a
# steady telemetry load showed as a steadily rising RSS. A turn touches a handful of pages;
# the OS page cache holds the rest of the file.
CACHE_KIB_PER_AGENT = 256
MAX_AGENT_ID_BYTES = 1024
# durability="normal": checkpoint after this many commits (a small turn's commit appends 2-4
# pages to the WAL, so ~1,000 pages, SQLite's own autocheckpoint default). Counting commits
# is free; SQLite exposes no WAL size without checkpointing.
CHECKPOINT_AFTER_COMMITS = 256
# A real page write (a counter: SQLite skips rewriting a row with identical content) that
# (re)starts the WAL, syncing its header, on the thread that calls it instead of in the next
# COMMIT on the loop.
_RESTART_WAL = (
    "INSERT INTO _gw_meta (key, value) VALUES ('wal_restarts', '1') "
    "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
)
# The kept WAL's record of the database file it belongs to (inode and size after the closing
# checkpoint), written into the WAL only; `open()` refuses to replay a WAL whose record does
# not match the file, and forgets the record in its transactions until one commits.
_WAL_FOR = "wal_for_file"
_FORGET_WAL_FOR = f"DELETE FROM _gw_meta WHERE key = '{_WAL_FOR}'"
# WAL bytes kept past a restart (SQLite truncates the file to this, or to what the restarting
# transaction wrote if larger): bounds the -wal file a hibernated agent leaves on disk.
_WAL_BYTES_KEPT = 64 * 1024
_WAL_HEADER_BYTES = 32
_WAL_FRAME_HEADER_BYTES = 24
# open_if_warm: the part of the database file that must be in the page cache (an open reads
# the header, the schema and the runtime's own tables, all near the start), and the largest
# WAL it reads on the loop (a kept WAL is at most _WAL_BYTES_KEPT).
_WARM_CHECK_BYTES = 64 * 1024
_WARM_WAL_MAX_BYTES = 256 * 1024
# Dedup streams whose last seq an open database remembers (a device per stream: usually 1).
_LAST_SEQS_CACHED = 64
_CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9_-]")
_READABLE_PREFIX_CHARS = 32
# Statements that would break the runtime's one-transaction-per-turn model.
_FORBIDDEN_FIRST_WORDS = frozenset(
    {"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "ATTACH", "DETACH", "VACUUM"}
)
# `_gw_turn_rows`: the rows the runtime writes in turns, in ONE b-tree, so that a commit's state
# and dedup seqs share a page (each table written is a page, a WAL frame, and in cluster mode a
# page replicated): the agent's state (id 0, JSON text) and each dedup stream's last applied
# seq (key "dedup:<stream>", an integer; ids from 1). `key` is unique (an index, written only
# when a stream is new). Schema version 1 had them as `_gw_state` and `_gw_dedup`.
_TURN_ROWS = "_gw_turn_rows"
_STATE_ID = 0
_DEDUP_KEY_PREFIX = "dedup:"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _gw_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {_TURN_ROWS} "
    "(id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, value)",
)
_LOAD_STATE = f"SELECT value FROM {_TURN_ROWS} WHERE id = {_STATE_ID}"
_SAVE_STATE = (
    f"INSERT INTO {_TURN_ROWS} (id, key, value) VALUES ({_STATE_ID}, 'state', ?) "
    "ON CONFLICT (id) DO UPDATE SET value = excluded.value"
)
_LOAD_SEQ = f"SELECT value FROM {_TURN_ROWS} WHERE key = '{_DEDUP_KEY_PREFIX}' || ?"
_SAVE_SEQ = (
    f"INSERT INTO {_TURN_ROWS} (key, value) VALUES ('{_DEDUP_KEY_PREFIX}' || ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


def _turn_rows_in_one_table(conn: sqlite3.Connection) -> None:
    """Schema version 1 -> 2: `_gw_state` and `_gw_dedup` become rows of `_gw_turn_rows`."""
    conn.execute(_SCHEMA[1])
    conn.execute(
        f"INSERT INTO {_TURN_ROWS} (id, key, value) "
        f"SELECT {_STATE_ID}, 'state', json FROM _gw_state WHERE id = 0"
    )
    conn.execute(
        f"INSERT INTO {_TURN_ROWS} (key, value) "
        f"SELECT '{_DEDUP_KEY_PREFIX}' || stream, last_seq FROM _gw_dedup ORDER BY rowid"
    )
    conn.execute("DROP TABLE _gw_state")
    conn.execute("DROP TABLE _gw_dedup")


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    _turn_rows_in_one_table(conn)
    outbox_schema.migrate_from_autoincrement(conn)  # _gw_outbox without AUTOINCREMENT


# version N -> N + 1, in the caller's transaction (tables created lazily by their stores, like
# `_gw_outbox`, are migrated here too when they exist).
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], object]] = {1: _migrate_1_to_2}
# `open()`'s identity check reads the agent's state with it (one statement on a new
# connection instead of two) when the file has the current schema: `_READ_META_AND_STATE`;
# `_NO_STATE` (compared by identity): no state stored.
_NO_STATE = "(no state stored)"


_ALARM_TABLES_SQL = "SELECT name FROM sqlite_master WHERE name IN ('_gw_schedules', '_gw_queue')"
_READ_META_AND_STATE = (
    f"SELECT 0, key, value FROM _gw_meta UNION ALL SELECT 1, NULL, * FROM ({_LOAD_STATE}) "
    f"UNION ALL SELECT 2, name, NULL FROM ({_ALARM_TABLES_SQL})"
)


def validate_class_name(agent_class: str) -> None:
    """Agent class names become directory names: keep them boring."""
    if not isinstance(agent_class, str) or not _CLASS_NAME_RE.match(agent_class):
        raise ValueError(
            f"agent class name {agent_class!r} must match {_CLASS_NAME_RE.pattern} "
            "(letters, digits, '_', '.', '-'; at most 64 characters)"
        )


def validate_agent_id(agent_id: str) -> None:
    if not isinstance(agent_id, str):
        raise ValueError(f"agent id must be a str, got {type(agent_id).__name__}")
    try:
        size = len(agent_id.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ValueError(f"agent id {agent_id!r} is not valid UTF-8 ({err.reason})") from None
    if not 1 <= size <= MAX_AGENT_ID_BYTES:
        raise ValueError(f"agent id must be 1..{MAX_AGENT_ID_BYTES} UTF-8 bytes, got {size}")


def agent_db_path(state_dir: Path, agent_class: str, agent_id: str) -> Path:
    """`state_dir/agents/<class>/<shard>/<readable-prefix>.<hash>.sqlite3`.

    The readable prefix keeps only `[A-Za-z0-9_-]` (so no '/', '..' or NUL can reach the file
    system); the 160-bit base32 SHA-256 of the full id makes names collision-free in practice,
    and the id stored inside the file is checked on open. The 2-character shard keeps
    directories small with 100,000s of agents.
    """
    return Path(agent_db_file(os.fspath(state_dir), agent_class, agent_id))


# `agent_db_file`'s recent answers: an agent that wakes again (the usual case in a long-running
# gateway) finds its file name without the hashing and encoding (~15-45 µs of a cold wake's
# ~1 ms). Bounded: 4,096 names, ~1.5 MB with the cache's entries.
_DB_FILES_CACHED = 4096


def agent_db_file(state_dir: str, agent_class: str, agent_id: str) -> str:
    """`agent_db_path` as a plain string. The runtime uses this one: `pathlib` interns every
    path component forever, which would grow memory with every agent ever woken."""
    if type(state_dir) is str and type(agent_class) is str and type(agent_id) is str:
        return _agent_db_file_cached(state_dir, agent_class, agent_id)
    return _agent_db_file(state_dir, agent_class, agent_id)


def _agent_db_file(state_dir: str, agent_class: str, agent_id: str) -> str:
    validate_class_name(agent_class)
    validate_agent_id(agent_id)
    # The first 32 base32 characters of the digest encode its first 20 bytes (8 per 5): only
    # those are encoded (base64's base32 is pure Python).
    digest = hashlib.sha256(agent_id.encode("utf-8")).digest()
    hashed = base64.b32encode(digest[:20]).decode("ascii").lower()
    prefix = _UNSAFE_CHARS_RE.sub("_", agent_id[:_READABLE_PREFIX_CHARS])
    return os.path.join(state_dir, "agents", agent_class, hashed[:2], f"{prefix}.{hashed}.sqlite3")


# (Only valid names are cached: lru_cache does not keep a call that raised.)
_agent_db_file_cached = functools.lru_cache(maxsize=_DB_FILES_CACHED)(_agent_db_file)


def stored_agent_id(path: str | os.PathLike[str], timeout_s: float = 0.5) -> str | None:
    """The agent id a database file stores, read-only and without the runtime (no agent is
    woken); None when the file cannot be read (not an agent database, not committed yet)."""
    try:
        conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True, timeout=timeout_s)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value FROM _gw_meta WHERE key = 'agent_id'").fetchone()
        return None if row is None else str(row[0])
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _file_identity(path: str) -> str:
    status = os.stat(path)
    return f"{status.st_ino}:{status.st_size}"


ParkedFiles = tuple[tuple[int, int, int], tuple[int, int, int]]
"""(inode, size, mtime ns) of a parked database's file and of its -wal file."""


def _parked_files(path: str) -> ParkedFiles | None:
    try:
        db = os.stat(path)
        wal = os.stat(path + "-wal")
    except OSError:
        return None
    return (db.st_ino, db.st_size, db.st_mtime_ns), (wal.st_ino, wal.st_size, wal.st_mtime_ns)


def _has_frames(wal_path: str) -> bool:
    try:
        return os.path.getsize(wal_path) > 32  # the WAL header is 32 bytes
    except OSError:
        return False


class _NotWarm(Exception):
    """`open_if_warm`: this open would write before the caller's transaction (or wait)."""


class _Warm:
    """What `_warm_probe` read of a file that may open on the loop: its identity (as
    `_file_identity`) and, from its header, its page size and user_version."""

    __slots__ = ("identity", "page_size", "user_version")

    def __init__(self, identity: str, page_size: int, user_version: int) -> None:
        self.identity = identity
        self.page_size = page_size
        self.user_version = user_version


_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
# `_warm_probe`'s read buffers (one per thread; in practice only the loop's).
_probe_buffers = threading.local()


def _probe_buffer() -> memoryview:
    buffer: memoryview | None = getattr(_probe_buffers, "view", None)
    if buffer is None:
        buffer = _probe_buffers.view = memoryview(bytearray(_WARM_WAL_MAX_BYTES))
    return buffer


def _read_cached(path: str, buffer: memoryview, limit: int, smallest: int) -> tuple[int, int, int]:
    """`(inode, size, bytes read)` of the file, its first `min(size, limit)` bytes read into
    `buffer` with RWF_NOWAIT (a read that returns only what the OS page cache holds, without
    waiting on the disk); bytes read is -1 where the file is smaller than `smallest` or those
    bytes are not all in the page cache."""
    assert _RWF_NOWAIT is not None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        size = status.st_size
        if size < smallest:
            return status.st_ino, size, -1
        wanted = min(size, limit)
        done = os.preadv(fd, [buffer[:wanted]], 0, _RWF_NOWAIT)
        return status.st_ino, size, done if done == wanted else -1
    finally:
        os.close(fd)


def _warm_probe(path: str) -> _Warm | None:
    """Loop: whether the agent's file may open on the loop (`open_if_warm`): it exists, it is
    ours (user_version set), its first `_WARM_CHECK_BYTES` and its whole kept WAL are in the OS
    page cache (an open reads nothing from the disk) and that WAL is started (its first frame
    carries its header's salts: the first COMMIT appends, no fsync). One open, fstat and
    non-blocking read per file; None when anything says no, or the system cannot tell."""
    if _RWF_NOWAIT is None:
        return None
    buffer = _probe_buffer()
    try:
        inode, size, done = _read_cached(path, buffer, _WARM_CHECK_BYTES, 100)
        if done < 100:
            return None
        header = bytes(buffer[:100])
        _wal_inode, _wal_size, wal_done = _read_cached(
            path + "-wal", buffer, _WARM_WAL_MAX_BYTES, _WAL_HEADER_BYTES + 1
        )
    except OSError:  # gone, EAGAIN (not cached), EOPNOTSUPP (the file system cannot say)
        return None
    if wal_done < _WAL_HEADER_BYTES + _WAL_FRAME_HEADER_BYTES or _wal_size > _WARM_WAL_MAX_BYTES:
        return None
    if not _is_started_wal(bytes(buffer[: _WAL_HEADER_BYTES + _WAL_FRAME_HEADER_BYTES])):
        return None
    if header[:16] != b"SQLite format 3\x00":
        return None
    page_size = int.from_bytes(header[16:18], "big")
    return _Warm(
        f"{inode}:{size}",
        65536 if page_size == 1 else page_size,
        int.from_bytes(header[60:64], "big"),
    )


def _is_started_wal(head: bytes) -> bool:
    """`_wal_started` on the WAL's first 56 bytes."""
    if len(head) < _WAL_HEADER_BYTES + _WAL_FRAME_HEADER_BYTES:
        return False
    salts = head[16:24]
    frame_salts = head[_WAL_HEADER_BYTES + 8 : _WAL_HEADER_BYTES + 16]
    return head[:3] == b"\x37\x7f\x06" and salts == frame_salts


def _wal_started(wal_path: str) -> bool:
    """Whether the WAL's first frame belongs to its header (same salts): the WAL was started
    and holds frames, so the next write appends to it without restarting it (which would
    sync its header). A header with no frame after it, or a stale frame, says False."""
    try:
        fd = os.open(wal_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        head = os.pread(fd, _WAL_HEADER_BYTES + _WAL_FRAME_HEADER_BYTES, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return _is_started_wal(head)


def _delete_wal_files(path: str) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _set_aside_stale_wal(path: str, label: str) -> None:
    """Keep the stale WAL for inspection (`-wal.stale`), never replay it."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(path + "-wal", path + "-wal.stale")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + "-shm")
    logger.warning(
        "agents: %s: %s-wal belongs to an earlier copy of the database file (replaced after "
        "the agent hibernated); set aside as %s-wal.stale, not replayed",
        label,
        path,
        path,
    )


def _first_word(query: str) -> str:
    """The statement's first word, upper-case."""
    if len(query) <= 1024:
        return _first_word_cached(query)  # an agent runs the same few queries again
    return query.lstrip()[:10].split(None, 1)[0].upper() if query.strip() else ""


@functools.lru_cache(maxsize=512)
def _first_word_cached(query: str) -> str:
    return query.lstrip()[:10].split(None, 1)[0].upper() if query.strip() else ""


def _check_value_size(value: Any, max_value_bytes: int, where: str) -> None:
    if isinstance(value, str):
        # A str encodes to at most 4 bytes per character: only encode when it could matter.
        if len(value) * 4 > max_value_bytes and len(value.encode("utf-8")) > max_value_bytes:
            raise ValueTooLargeError(
                f"{where}: text value of {len(value.encode('utf-8'))} bytes exceeds the "
                f"{max_value_bytes}-byte limit per value; split it into several rows"
            )
    elif isinstance(value, bytes | bytearray | memoryview) and len(value) > max_value_bytes:
        raise ValueTooLargeError(
            f"{where}: blob of {len(value)} bytes exceeds the {max_value_bytes}-byte limit "
            "per value; split it into several rows"
        )


class AgentDatabase:
    """An open agent database. Create with `AgentDatabase.open(...)`."""

    __slots__ = (
        "_changes_at_begin",
        "_commits_since_checkpoint",
        "_conn",
        "_forget_wal_record",
        "_io_lock",
        "_label",
        "_last_seqs",
        "_max_db_bytes",
        "_max_value_bytes",
        "_opened_alarm_tables",
        "_opened_state",
        "_state_at_savepoint",
        "_unwritten_seqs",
        "_unwritten_state",
        "commit_fsyncs",
        "in_transaction_",
        "keeps_wal",
        "path",
    )

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: str,
        label: str,
        max_value_bytes: int,
        max_db: int,
        commit_fsyncs: bool = True,
    ) -> None:
        self._conn = conn
        self.path = path
        self._label = label
        self._max_value_bytes = max_value_bytes
        self._max_db_bytes = max_db
        self.in_transaction_ = False
        # False (durability="normal"): COMMIT never fsyncs and may run on the loop.
        self.commit_fsyncs = commit_fsyncs
        self._commits_since_checkpoint = 0
        # `total_changes` when the open transaction began: a turn needs no SAVEPOINT while
        # nothing changed since (see `turn_savepoint`).
        self._changes_at_begin = -1
        # Dedup streams' last applied seq as read or written (a cache), and the seqs that the
        # open transaction's turns applied, written before its COMMIT (`write_seqs`); both
        # forgotten with any rollback.
        self._last_seqs: dict[str, int | None] = {}
        self._unwritten_seqs: dict[str, int] = {}
        # The agent's state as the open transaction's turns left it, written once before its
        # COMMIT (`write_state`), not once per turn; and its value when the current turn (or
        # savepoint) began, restored when that is undone.
        self._unwritten_state: str | None = None
        self._state_at_savepoint: str | None = None
        self._io_lock = threading.Lock()
        # Set while the kept WAL's ownership record (`_WAL_FOR`) must be forgotten by the
        # next transaction (`begin`): from a wake until a COMMIT made that durable.
        self._forget_wal_record = False
        # close() keeps the -wal/-shm files and restarts the WAL itself (keepwal.py).
        self.keeps_wal = False
        # The state's JSON as `open()` read it (`_NO_STATE`: none stored), until the first
        # `load_state` or `save_state`; None: not read.
        self._opened_state: str | None = None
        # The schedule/queue tables the file had when `open()` read its identity, until the
        # first `alarm_tables()`; None: not read.
        self._opened_alarm_tables: set[str] | None = None

    @classmethod
    def open_if_warm(
        cls,
        state_dir: Path,
        agent_class: str,
        agent_id: str,
        *,
        durability: str,
        max_db_bytes: int,
        max_value_bytes: int,
    ) -> AgentDatabase | None:
        """Loop: `open()` without leaving the event loop thread, or None (then use `open()`
        on the executor). Only where the open can neither fsync nor wait on the disk:
        durability="normal", an existing file with a kept, started WAL (keepwal.py: the
        first COMMIT appends to it), and the file's first pages and its WAL in the OS page
        cache (a non-blocking read says so). Anything else (a new file, a WAL to start or to
        set aside, keepwal unavailable, cold pages) returns None before any write."""
        if durability == "full":
            return None
        path = agent_db_file(os.fspath(state_dir), agent_class, agent_id)
        warm = _warm_probe(path)
        if warm is None:
            return None
        try:
            return cls._open(
                path, agent_class, agent_id, durability, max_db_bytes, max_value_bytes, warm=warm
            )
        except _NotWarm:
            return None

    @classmethod
    def open(
        cls,
        state_dir: Path,
        agent_class: str,
        agent_id: str,
        *,
        durability: str,
        max_db_bytes: int,
        max_value_bytes: int,
    ) -> AgentDatabase:
        """Open (creating if needed) the agent's file; executor only (it may fsync). With
        durability="full" a new file's schema is written inside an open transaction that the
        caller's first commit makes durable. With "normal", a kept WAL that holds frames
        (keepwal.py) is appended to by the caller's first COMMIT without an fsync: the open
        leaves a transaction open whose first write forgets the WAL-ownership record (as
        `resume` does); otherwise the write that (re)starts the WAL, and a new file's schema,
        are committed here and no transaction is left open."""
        path = agent_db_file(os.fspath(state_dir), agent_class, agent_id)
        return cls._open(path, agent_class, agent_id, durability, max_db_bytes, max_value_bytes)

    @classmethod
    def _open(
        cls,
        path: str,
        agent_class: str,
        agent_id: str,
        durability: str,
        max_db_bytes: int,
        max_value_bytes: int,
        *,
        warm: _Warm | None = None,
        _stale_wal_retry: bool = False,
    ) -> AgentDatabase:
        """`open()`; with `warm` (`open_if_warm`: what `_warm_probe` read of the files),
        raises `_NotWarm` wherever it would write before the caller's first transaction."""
        label = f"agent {agent_class}/{agent_id!r}"
        if warm is not None:
            # The probe found the file (not empty) and a started WAL next to it.
            exists, is_new, wal_present = True, False, True
        else:
            # A 0-byte file is new too: its creation was interrupted (e.g. the disk was
            # full), and it must still be switched to WAL.
            try:
                exists, is_new = True, os.stat(path).st_size == 0
            except FileNotFoundError:
                exists, is_new = False, True
            if is_new:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            if not exists:
                # A -wal/-shm left by a file moved or deleted (it stays after a close, see
                # above) would be replayed into the new, empty file.
                _delete_wal_files(path)
            # The WAL-ownership record is only checked when a WAL is there to replay: a
            # record that reached the database file itself (another connection checkpointed
            # the kept WAL) says nothing about a WAL, and the first transaction below
            # forgets it.
            wal_present = not _stale_wal_retry and exists and _has_frames(path + "-wal")
        try:
            conn = sqlite3.connect(
                path,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=64,
                timeout=_BUSY_TIMEOUT_S,  # sets the busy handler without a PRAGMA
            )
        except sqlite3.Error as err:
            raise StorageError(f"{label}: cannot open {path}: {err}") from err
        full = durability == "full"
        db = cls(conn, path, label, max_value_bytes, max_db_bytes, commit_fsyncs=full)
        try:
            db.keeps_wal = not full and keepwal.keep_wal(conn, path)
            if warm is not None and not db.keeps_wal:
                raise _NotWarm
            # The connection's settings in one call (its first statement opens the -wal and
            # -shm files and, for the first connection, rebuilds the WAL index).
            settings = [
                f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}",
                f"PRAGMA cache_size=-{CACHE_KIB_PER_AGENT}",
            ]
            if db.keeps_wal:
                settings.append(f"PRAGMA journal_size_limit={_WAL_BYTES_KEPT}")
            if not full:
                settings.append("PRAGMA wal_autocheckpoint=0")  # see the module docstring
            if is_new:
                settings.append("PRAGMA journal_mode=WAL")
            if warm is not None and warm.user_version == SCHEMA_VERSION:
                # The file's header says what the query below would: its page size (fixed
                # in WAL mode) and a current schema (nothing to create or migrate).
                version = warm.user_version
                max_pages = max(1, max_db_bytes // warm.page_size)
                settings.append(f"PRAGMA max_page_count={max_pages}")
                conn.executescript(";".join(settings))
            else:
                conn.executescript(";".join(settings))
                page_size, version = conn.execute(
                    "SELECT page_size, user_version FROM pragma_page_size, pragma_user_version"
                ).fetchone()
                conn.execute(f"PRAGMA max_page_count={max(1, max_db_bytes // page_size)}")
            if version == 0:
                if warm is not None:
                    raise _NotWarm
                db.begin()
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR REPLACE INTO _gw_meta (key, value) VALUES "
                    "('agent_class', ?), ('agent_id', ?)",
                    (agent_class, agent_id),
                )
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            else:
                # The agent's state is read with the identity (one statement, not two):
                # `load_state` answers from it.
                stored: dict[str, str] = {}
                if version == SCHEMA_VERSION:
                    db._opened_state = _NO_STATE
                    alarm_tables: set[str] = set()
                    for part, key, value in conn.execute(_READ_META_AND_STATE):
                        if part == 0:
                            stored[key] = value
                        elif part == 1:
                            db._opened_state = value
                        else:
                            alarm_tables.add(key)
                    db._opened_alarm_tables = alarm_tables
                else:  # (an older schema's state is read after its migration)
                    stored = dict(conn.execute("SELECT key, value FROM _gw_meta").fetchall())
                wal_for = stored.get(_WAL_FOR)
                identity = warm.identity if warm is not None else None
                if (
                    wal_present
                    and wal_for is not None
                    and wal_for != (identity or _file_identity(path))
                ):
                    # The file was replaced (say, a backup restored) after the agent closed
                    # it: the kept WAL belongs to the earlier file and must not be replayed.
                    if warm is not None:
                        raise _NotWarm  # (open() sets the WAL aside, off the loop)
                    conn.close()
                    _set_aside_stale_wal(path, label)
                    return cls._open(
                        path,
                        agent_class,
                        agent_id,
                        durability,
                        max_db_bytes,
                        max_value_bytes,
                        _stale_wal_retry=True,
                    )
                if stored.get("agent_class") != agent_class or stored.get("agent_id") != agent_id:
                    raise CorruptDatabaseError(
                        f"{label}: {path} belongs to agent {stored.get('agent_class')}/"
                        f"{stored.get('agent_id')!r}; refusing to use it"
                    )
                if version > SCHEMA_VERSION:
                    raise CorruptDatabaseError(
                        f"{label}: {path} has schema version {version}, written by a newer "
                        f"gatewayd (this one knows versions up to {SCHEMA_VERSION}); refusing "
                        "to use it: run the newer gatewayd"
                    )
                if version < SCHEMA_VERSION:
                    if warm is not None:
                        raise _NotWarm  # (open() migrates it, off the loop)
                    db._migrate(version)
                if (
                    db.keeps_wal
                    and wal_present
                    and (warm is not None or _wal_started(path + "-wal"))
                ):
                    # The WAL holds frames: the first COMMIT appends to it (no fsync), so
                    # there is nothing to start here; forget the ownership record in the
                    # caller's first transaction (committed before any checkpoint can copy
                    # it into the file).
                    db._forget_wal_record = True
                    db.begin()
                    return db
            if warm is not None:
                raise _NotWarm
            if not full:
                # Start the WAL here, on the executor, not in the first COMMIT on the loop
                # (a new file's schema is committed here too).
                if not db.in_transaction_:
                    db.begin()
                conn.execute(_RESTART_WAL)
                conn.execute(_FORGET_WAL_FOR)  # the WAL is this connection's from here on
                conn.execute("COMMIT")
                db.in_transaction_ = False
        except sqlite3.Error as err:
            conn.close()
            raise StorageError(f"{label}: cannot initialise {path}: {err}") from err
        except BaseException:
            conn.close()
            raise
        return db

    def _migrate(self, version: int) -> None:
        """Executor only (it commits): bring a file of an older schema version up to
        `SCHEMA_VERSION`, all steps in one transaction of their own, so a failure (a full
        disk, a crash) leaves the file as it was and the next open tries again. It also
        forgets the WAL-ownership record, as the open's first transaction would."""
        conn = self._conn
        self.begin()
        try:
            for step in range(version, SCHEMA_VERSION):
                _MIGRATIONS[step](conn)
            conn.execute(_FORGET_WAL_FOR)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            self.in_transaction_ = conn.in_transaction
            if self.in_transaction_:
                self.rollback()
        logger.debug(
            "agents: %s: %s migrated from schema version %d to %d",
            self._label,
            self.path,
            version,
            SCHEMA_VERSION,
        )

    # -- transactions (loop thread) -------------------------------------------------------

    @property
    def connection(self) -> sqlite3.Connection:
        """The raw connection, for storage helpers that run inside the current transaction."""
        return self._conn

    def begin(self) -> None:
        if not self.in_transaction_:
            self._conn.execute("BEGIN")
            self.in_transaction_ = True
            if self._forget_wal_record:
                # After a wake, until a COMMIT made it durable, every transaction first
                # forgets the kept WAL's ownership record (see `_open`). Part of the BEGIN:
                # the first turn still needs no savepoint (undoing it begins again).
                self._conn.execute(_FORGET_WAL_FOR)
            self._changes_at_begin = self._conn.total_changes

    def savepoint(self) -> None:
        self._conn.execute("SAVEPOINT gw_turn")
        self._state_at_savepoint = self._unwritten_state

    def release(self) -> None:
        self._conn.execute("RELEASE gw_turn")

    def rollback_to_savepoint(self) -> None:
        self._conn.execute("ROLLBACK TO gw_turn")
        self._conn.execute("RELEASE gw_turn")
        self._unwritten_state = self._state_at_savepoint

    def turn_savepoint(self) -> bool:
        """Start a turn: a SAVEPOINT, unless no row changed in the open transaction yet (the
        first turn of a batch, usually): then undoing the turn is undoing the transaction
        (`undo_turn(False)`: ROLLBACK, BEGIN), and two statements per batch are saved.
        Returns whether a savepoint was opened. (Schema changes do not count as changes:
        what a rollback undoes of them is re-created by its store, see turn.py.)"""
        self._state_at_savepoint = self._unwritten_state
        if self._changes_at_begin == self._conn.total_changes and self.in_transaction_:
            return False
        self._conn.execute("SAVEPOINT gw_turn")
        return True

    def keep_savepoints(self) -> None:
        """The open transaction holds work that undoing a turn must not undo, though no row
        changed (a store's tables created outside any turn): every turn takes a savepoint
        until the next BEGIN."""
        self._changes_at_begin = -1

    def end_turn(self, savepoint: bool) -> None:
        """The turn ended well: what it did stays in the transaction (the next turn of the
        batch gets a savepoint, even if this one only changed the schema)."""
        if savepoint:
            self._conn.execute("RELEASE gw_turn")
        self._changes_at_begin = -1

    def undo_turn(self, savepoint: bool) -> None:
        """Undo what the turn wrote; the batch's transaction stays open."""
        if savepoint:
            self._conn.execute("ROLLBACK TO gw_turn")
            self._conn.execute("RELEASE gw_turn")
            self._unwritten_state = self._state_at_savepoint
        else:
            self.rollback()
            self.begin()

    def commit(self) -> None:
        """With durability=full this fsyncs the WAL: run it on the commit executor. With
        "normal" it never fsyncs (no autocheckpoint, WAL already started) and runs inline.
        Writes the batch's dedup seqs and state first (`write_seqs`, `write_state`), if that
        was not done yet."""
        self.write_seqs()
        self.write_state()
        try:
            self._conn.execute("COMMIT")
        finally:
            self.in_transaction_ = self._conn.in_transaction
        self._forget_wal_record = False
        self._commits_since_checkpoint += 1

    def needs_checkpoint(self) -> bool:
        """durability="normal" only (with "full", SQLite's autocheckpoint runs inside the
        executor-side COMMIT): enough commits since the last checkpoint."""
        return (
            not self.commit_fsyncs
            and self._commits_since_checkpoint >= CHECKPOINT_AFTER_COMMITS
            and not self.in_transaction_
        )

    def checkpoint(self) -> None:
        """Executor only (fsyncs): copy the WAL into the database file, then restart the WAL
        here so the next COMMIT on the loop does not sync a new WAL header."""
        with self._io_lock:
            self._commits_since_checkpoint = 0
            busy, _log_pages, _done_pages = self._conn.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
            if busy:
                return
            self.begin()
            try:
                self._conn.execute(_RESTART_WAL)
                self._conn.execute("COMMIT")
                self._forget_wal_record = False
            finally:
                self.in_transaction_ = self._conn.in_transaction
                if self.in_transaction_:
                    self.rollback()
            # Hand the page cache back: an appending agent's cache otherwise fills with pages
            # it will not read again, slowly (a quiet agent takes half an hour), which shows
            # as RSS creeping up under steady load. Its next turns re-read a handful of pages
            # from the OS page cache.
            self._conn.execute("PRAGMA shrink_memory")

    def rollback(self) -> None:
        self._last_seqs.clear()
        self._unwritten_seqs.clear()
        self._unwritten_state = None
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        self.in_transaction_ = False

    def close(self) -> None:
        """Executor only (fsyncs). Checkpoints the WAL; with `keeps_wal`, restarts it with the
        tiny write (so the next `open()` appends without an fsync) and keeps the files."""
        with self._io_lock:
            try:
                self.rollback()
                if self.keeps_wal:
                    self._restart_wal_for_next_open()
            finally:
                self._conn.close()

    # -- parking: a hibernated agent's connection kept open for a quick wake --------------

    def park(self) -> ParkedFiles | None:
        """Executor only (fsyncs): everything `close()` does except closing the connection,
        so that a wake soon after can take the connection back instead of opening the file.
        Returns what the files look like afterwards (`resume` compares), or None when the
        database cannot be parked (no kept WAL, or its restart did not happen): then close
        it with `close()`."""
        with self._io_lock:
            self.rollback()
            if not self.keeps_wal or not self._restart_wal_for_next_open():
                return None
            self._commits_since_checkpoint = 0
            self._conn.execute("PRAGMA shrink_memory")  # a parked agent holds no page cache
            return _parked_files(self.path)

    def resume(self, parked: ParkedFiles) -> bool:
        """Loop: take a parked connection back for the agent's wake. False (use `close_parked`
        and `open()` instead) when the files changed since `park()` (another process wrote,
        replaced, moved or damaged them: only a fresh `open()` checks them). True: a
        transaction is open whose first write forgets the WAL-ownership record, as `open()`
        does (the caller's first commit makes that durable)."""
        if _parked_files(self.path) != parked:
            return False
        self._forget_wal_record = True
        try:
            self.begin()
        except sqlite3.Error:
            self.rollback()
            return False
        return True

    def close_parked(self) -> None:
        """Executor only: close a parked connection; `park()` already did the rest."""
        with self._io_lock:
            self._conn.close()

    def _restart_wal_for_next_open(self) -> bool:
        conn = self._conn
        try:
            busy, _log_pages, _done_pages = conn.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
            if busy:
                return False  # the WAL keeps its frames: the next open appends to it
            identity = _file_identity(self.path)  # after the checkpoint wrote the file
            conn.execute("BEGIN")
            try:
                conn.execute(_RESTART_WAL)
                conn.execute(
                    "INSERT INTO _gw_meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_WAL_FOR, identity),
                )
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error:
            # E.g. a full disk: the WAL still holds every committed frame (the close does not
            # delete it), and the next open restarts it if it has to.
            return False
        return True

    # -- agent data -------------------------------------------------------------------------

    def alarm_tables(self) -> set[str]:
        """Which of the schedule and queue tables (`_gw_schedules`, `_gw_queue`) the file
        has now."""
        self._opened_alarm_tables = None
        return {row[0] for row in self._conn.execute(_ALARM_TABLES_SQL)}

    def take_opened_alarm_tables(self) -> set[str] | None:
        """`alarm_tables()` as `open()` read it with the identity (no statement), once; None
        when it was not read or was taken. Only the caller knows whether the schema may have
        changed since the open."""
        opened, self._opened_alarm_tables = self._opened_alarm_tables, None
        return opened

    def load_state(self) -> tuple[bool, Any]:
        opened, self._opened_state = self._opened_state, None
        if opened is not None:
            return (False, None) if opened is _NO_STATE else (True, json.loads(opened))
        row = self._conn.execute(_LOAD_STATE).fetchone()
        if row is None:
            return False, None
        return True, json.loads(row[0])

    def save_state(self, state_json: str) -> None:
        """The turn's new state: checked now, written by `write_state` before the COMMIT (a
        batch of turns that each change the state writes the row once)."""
        self._opened_state = None
        _check_value_size(state_json, self._max_value_bytes, f"{self._label}: set_state")
        self._unwritten_state = state_json

    def write_state(self) -> None:
        """Before the COMMIT (and before cluster mode sees the transaction): write the state
        the batch's turns left."""
        state_json = self._unwritten_state
        if state_json is None:
            return
        self._execute(_SAVE_STATE, (state_json,))
        self._unwritten_state = None

    def last_seq(self, stream: str) -> int | None:
        unwritten = self._unwritten_seqs.get(stream)
        if unwritten is not None:
            return unwritten
        cached = self._last_seqs.get(stream, -1)
        if cached != -1:
            return cached
        row = self._conn.execute(_LOAD_SEQ, (stream,)).fetchone()
        last = None if row is None else int(row[0])
        if len(self._last_seqs) >= _LAST_SEQS_CACHED:
            self._last_seqs.clear()
        self._last_seqs[stream] = last
        return last

    def set_last_seq(self, stream: str, seq: int) -> None:
        """The turn that applied (or consumed) `seq` of `stream` ended well. The row is
        written once per stream and batch, in its transaction, by `write_seqs` before the
        COMMIT (a batch of 50 frames from one device writes it once, not 50 times); until
        then `last_seq` answers from memory. A rollback forgets it (the turns are undone)."""
        self._unwritten_seqs[stream] = seq
        self._changes_at_begin = -1  # the transaction holds work now (see turn_savepoint)

    def write_seqs(self) -> None:
        """Before the COMMIT (and before cluster mode sees the transaction): write the seqs
        the batch's turns applied."""
        unwritten = self._unwritten_seqs
        if not unwritten:
            return
        rows = list(unwritten.items())
        try:
            self._conn.executemany(_SAVE_SEQ, rows)
        except sqlite3.OperationalError as err:
            if "full" in str(err):
                raise StorageFullError(
                    f"{self._label}: database reached its cap of {self._max_db_bytes} bytes "
                    f"(agents.max_db_size) or the disk is full: {err}"
                ) from err
            raise
        unwritten.clear()
        if len(self._last_seqs) + len(rows) > _LAST_SEQS_CACHED:
            self._last_seqs.clear()
        self._last_seqs.update(rows)

    def sql(self, query: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        """Run one statement with bound parameters; rows as dicts."""
        first_word = _first_word(query)
        if first_word in _FORBIDDEN_FIRST_WORDS:
            raise AgentError(
                f"{self._label}: sql({first_word} ...) is not allowed: the runtime manages "
                "transactions (one per turn) and attached databases"
            )
        limit = self._max_value_bytes
        for param in params:
            _check_value_size(param, limit, f"{self._label}: sql parameter")
        cursor = self._execute(query, params)
        description = cursor.description
        if description is None:
            return []
        names = [column[0] for column in description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _execute(self, query: str, params: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self._conn.execute(query, params)
        except sqlite3.OperationalError as err:
            if "full" in str(err):
                raise StorageFullError(
                    f"{self._label}: database reached its cap of {self._max_db_bytes} bytes "
                    f"(agents.max_db_size) or the disk is full: {err}"
                ) from err
            raise
        except sqlite3.DataError as err:  # e.g. SQLITE_TOOBIG if the guard was bypassed
            raise ValueTooLargeError(f"{self._label}: {err}") from err

    @staticmethod
    def delete_files(path: str) -> None:
        for suffix in ("", "-wal", "-shm", "-journal", "-wal.stale"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
