"""Keep an agent database's -wal and -shm files when its connection closes.

Why: with durability="normal" the first write into an empty (new or deleted) WAL restarts it
and fsyncs its header. SQLite deletes the WAL when the last connection closes, so every wake
of a hibernated agent paid that fsync (milliseconds on a busy disk) before its first turn.
With the files kept, the close restarts the WAL (storage.py: `AgentDatabase.close`), paying
the fsync when the agent goes to sleep, and the next open appends to that WAL without one.

How: two documented SQLite switches, `SQLITE_FCNTL_PERSIST_WAL` (keep the files) and
`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE` (the close does not checkpoint: the caller already did).
Python's `sqlite3` module exposes neither before Python 3.12 (`setconfig`) and never the file
control, so they are called through ctypes on the connection's `sqlite3*` handle, and only
when it is safe: CPython, the `_sqlite3` module linked against the shared libsqlite3 already
loaded in this process (so ctypes calls the same library instance), and the handle read from
the connection object names the expected file (checked on the first connection of each
connection type: the object layout it relies on is the type's). Otherwise `keep_wal` returns False and SQLite
behaves as before (the close checkpoints and deletes the files): slower wakes, same
durability. Durability is unchanged either way: commits write and sync exactly as before.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sqlite3
import threading

_SQLITE_FCNTL_PERSIST_WAL = 10
_SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE = 1006

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_probed = False


def _loaded_sqlite_library() -> str | None:
    """Path of the libsqlite3 mapped into this process (by `_sqlite3`), if any."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1]
                if "/libsqlite3.so" in path and os.path.exists(path):
                    return path
    except OSError:
        return None
    return None


def _library_or_none() -> ctypes.CDLL | None:
    global _library, _probed
    with _lock:
        if _probed:
            return _library
        _probed = True
        if platform.python_implementation() != "CPython":
            return None
        import _sqlite3  # noqa: F401  (maps libsqlite3 if the module links it dynamically)

        path = _loaded_sqlite_library()
        if path is None:
            return None  # sqlite compiled into _sqlite3: ctypes would load a second copy
        try:
            library = ctypes.CDLL(path)
            library.sqlite3_libversion.restype = ctypes.c_char_p
            library.sqlite3_libversion.argtypes = []
            version = library.sqlite3_libversion()
        except (OSError, AttributeError):
            return None
        if version is None or version.decode() != sqlite3.sqlite_version:
            return None
        library.sqlite3_db_filename.restype = ctypes.c_char_p
        library.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        library.sqlite3_file_control.restype = ctypes.c_int
        library.sqlite3_file_control.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        library.sqlite3_db_config.restype = ctypes.c_int
        _library = library
        return library


def _handle(conn: sqlite3.Connection) -> int | None:
    # CPython's pysqlite_Connection starts with PyObject_HEAD, then `sqlite3 *db`.
    address = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
    return address or None


# Connection types whose `_handle` was shown to be their `sqlite3 *` (it named the file the
# connection opened): the layout of a type does not change, so it is checked once per type.
_checked_types: set[type] = set()
_ONE = ctypes.c_int(1)  # read, never written, by SQLITE_FCNTL_PERSIST_WAL (value >= 0)


def _names_file(library: ctypes.CDLL, handle: int, path: str) -> bool:
    name = library.sqlite3_db_filename(handle, b"main")
    if name is None:
        return False
    opened = os.fsdecode(name)
    return opened == os.path.abspath(path) or opened == os.path.realpath(path)


def keep_wal(conn: sqlite3.Connection, path: str) -> bool:
    """Make `conn`'s close keep the -wal/-shm files and skip its checkpoint. True if set;
    call before the first statement that opens the WAL. The caller must checkpoint (and
    restart the WAL) itself before closing."""
    library = _library if _library is not None else _library_or_none()
    if library is None:
        return False
    handle = _handle(conn)
    if handle is None:
        return False
    kind = type(conn)
    if kind not in _checked_types:
        if not _names_file(library, handle, path):
            return False  # not the handle we expected: leave SQLite's defaults alone
        _checked_types.add(kind)
    if library.sqlite3_file_control(handle, b"main", _SQLITE_FCNTL_PERSIST_WAL, ctypes.byref(_ONE)):
        return False
    applied = ctypes.c_int(-1)
    result = library.sqlite3_db_config(
        ctypes.c_void_p(handle),
        ctypes.c_int(_SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE),
        ctypes.c_int(1),
        ctypes.byref(applied),
    )
    if result or applied.value != 1:
        persist = ctypes.c_int(0)
        library.sqlite3_file_control(
            handle, b"main", _SQLITE_FCNTL_PERSIST_WAL, ctypes.byref(persist)
        )
        return False
    return True
