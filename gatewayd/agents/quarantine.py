"""Quarantine of agents whose SQLite file is corrupt (or belongs to another agent).

A damaged file does not heal by retrying: reopening it for every event would burn CPU and fill
the log while the transports retry. So the first time the wake or commit path sees SQLite say
"file is not a database" / "database disk image is malformed" (or the file names another
agent), the agent is *quarantined*: one ERROR line names the agent, the file and what to do,
and from then on its events are refused at once with `AgentQuarantinedError` (not
acknowledged, so the devices or the broker keep them) without touching the file. Every other
agent keeps serving.

The quarantine ends by itself when the file changes (restored from a backup, or moved aside so
that the agent starts empty): the next event checks the file's identity (inode, size, mtime)
with one `stat`, and opens it again if it is not the file that was quarantined. A restart
also clears it (and re-quarantines a file that is still damaged).

Imports only the standard library and `gatewayd.agents.errors`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass

from gatewayd.agents.errors import AgentQuarantinedError, CorruptDatabaseError

logger = logging.getLogger(__name__)

AgentKey = tuple[str, str]
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_FileIdentity = tuple[int, int, int] | None  # (inode, size, mtime_ns); None: no file
_NOT_YET = (-1, -1, -1)  # taken at the first refusal, after the agent's database was closed


def corruption_of(err: BaseException | None) -> BaseException | None:
    """The error in `err`'s cause chain saying that the database file is damaged, or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CorruptDatabaseError):
            return err
        if isinstance(err, sqlite3.DatabaseError):
            code = getattr(err, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                return err
        err = err.__cause__ or err.__context__
    return None


def _identity(path: str) -> _FileIdentity:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Entry:
    path: str
    reason: str
    identity: _FileIdentity
    since_s: float
    refused: int = 0


class Quarantine:
    """The quarantined agents of one runtime (loop thread only)."""

    def __init__(self) -> None:
        self._entries: dict[AgentKey, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def add(self, key: AgentKey, path: str, err: BaseException) -> AgentQuarantinedError:
        """Quarantine `key` (its file at `path` is damaged, `err` says how); logs once."""
        reason = f"{type(err).__name__}: {err}"
        # The file's identity is taken at the first refusal: an agent quarantined mid-turn
        # still has the file open, and closing it (a checkpoint) changes it once more.
        self._entries[key] = _Entry(path, reason, _NOT_YET, time.monotonic())
        logger.error(
            "agents: %s/%r QUARANTINED: its database file %s is corrupt (%s). Its events are "
            "refused (not acknowledged) until the file changes; every other agent keeps "
            "serving. To repair: restore that file from a backup, or move it (and its -wal, "
            "-shm files) aside so the agent starts empty, and keep the damaged copy for "
            "inspection; the agent is retried by itself once the file changed.",
            key[0],
            key[1],
            path,
            reason,
        )
        return self._refusal(key, self._entries[key])

    def refusal(self, key: AgentKey) -> AgentQuarantinedError | None:
        """The error to fail `key`'s events with while it is quarantined; None if it is not
        (any more: a changed file lifts the quarantine)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.identity == _NOT_YET:
            entry.identity = _identity(entry.path)
        elif _identity(entry.path) != entry.identity:
            del self._entries[key]
            logger.warning(
                "agents: %s/%r: database file %s changed after %d refused events; lifting the "
                "quarantine and opening it again",
                key[0],
                key[1],
                entry.path,
                entry.refused,
            )
            return None
        entry.refused += 1
        return self._refusal(key, entry)

    @staticmethod
    def _refusal(key: AgentKey, entry: _Entry) -> AgentQuarantinedError:
        return AgentQuarantinedError(
            f"agent {key[0]}/{key[1]!r} is quarantined: its database {entry.path} is corrupt "
            f"({entry.reason}); restore or move the file aside"
        )
