"""`DiskSpaceGuard`: what the runtime does when the state directory's file system is full.

SQLite answers a write on a full disk with SQLITE_FULL ("database or disk is full"), sometimes
SQLITE_IOERR (the -shm or -wal file could not grow). Before this guard, each failed commit
reloaded its agent from disk and every transport retry tried again: thousands of identical
log lines a second, and an agent re-opened for every message. Now:

* The first storage error that looks like a full disk is checked with a probe: reserve
  `probe_bytes` in a scratch file next to the agents (`posix_fallocate`, off the loop). If that
  fails too, the gateway enters the *disk full* state and logs ONE line saying so, where, and
  what to do. (If the probe succeeds, the error was one agent's own `max_db_size` cap, which
  stays that agent's problem.)
* While full, nothing is acknowledged: new messages are answered with
  `protocols.link.Backpressure` (the transports stop reading and hold them; the broker and the
  devices keep theirs), events already queued fail the same way, and no agent is woken.
* The probe runs every `interval_s`; once it succeeds, one line says that space is back,
  `Backpressure.ready` resolves and the transports resubmit what they held. Everything
  acknowledged before the disk filled was committed, so nothing acknowledged is lost.

Imports only the standard library and `protocols.link`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from protocols.link import Backpressure

logger = logging.getLogger(__name__)

PROBE_BYTES = 4 * 1024 * 1024  # room for a few batches of WAL frames of many agents
PROBE_INTERVAL_S = 1.0
PROBE_FILE_NAME = ".gatewayd-space-probe"
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def looks_like_disk_full(err: BaseException | None) -> bool:
    """Whether `err` (or its cause chain) is a storage error a full disk would explain."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
            return True
        if isinstance(err, sqlite3.Error):
            code = getattr(err, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR):
                return True
        err = err.__cause__ or err.__context__
    return False


def has_space(directory: str, probe_bytes: int = PROBE_BYTES) -> bool:
    """Whether `probe_bytes` can really be allocated in `directory` (blocking: executor only).

    An allocation, not `statvfs`: it also sees quotas and root's reserved blocks."""
    path = os.path.join(directory, PROBE_FILE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as err:
        if err.errno in _NO_SPACE_ERRNOS:
            return False
        raise
    try:
        os.posix_fallocate(fd, 0, probe_bytes)
    except OSError as err:
        if err.errno in _NO_SPACE_ERRNOS:
            return False
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        st = os.statvfs(directory)  # no fallocate here: the next best answer
        return st.f_bavail * st.f_frsize >= probe_bytes
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return True


class DiskSpaceGuard:
    """The disk-full state of one state directory (see the module docstring).

    `start()` on the loop; `check(err)` after a storage error; `refusal()` while full;
    `close()` at shutdown.
    """

    def __init__(
        self,
        directory: str,
        *,
        probe_bytes: int = PROBE_BYTES,
        interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.directory = directory
        self.probe_bytes = probe_bytes
        self.interval_s = interval_s
        self.times_full = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._ready: asyncio.Future[None] | None = None  # set while full
        self._reason = ""
        self._since = 0.0
        self._probe: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        self._loop = loop
        self._executor = executor

    @property
    def full(self) -> bool:
        return self._ready is not None

    def refusal(self) -> Backpressure | None:
        """While full: the `Backpressure` to answer events with (nothing is enqueued)."""
        if self._ready is None:
            return None
        return Backpressure(self._reason, self._ready)

    async def check(self, err: BaseException) -> bool:
        """After a storage error: True if the disk is full (entering that state, with its one
        log line, if not in it yet)."""
        if self._ready is not None:
            return True
        if not looks_like_disk_full(err) or self._loop is None:
            return False
        try:
            space = await self._loop.run_in_executor(
                self._executor, has_space, self.directory, self.probe_bytes
            )
        except OSError as probe_err:
            logger.warning("agents: cannot probe free space in %s: %s", self.directory, probe_err)
            return False
        if space:
            return False
        if self._ready is None:  # another agent's check may have entered it meanwhile
            self._enter(err)
        return True

    def _enter(self, err: BaseException) -> None:
        assert self._loop is not None
        self.times_full += 1
        self._ready = self._loop.create_future()
        self._since = self._loop.time()
        self._reason = (
            f"state directory {self.directory} is full; nothing is acknowledged until space "
            "is freed"
        )
        logger.error(
            "agents: DISK FULL: the file system of the state directory %s has no space left "
            "(%s: %s). Not committing or acknowledging anything: transports hold new messages "
            "(brokers and devices keep theirs) and nothing acknowledged is lost. Free space on "
            "that file system (or grow it); the gateway checks every %.0fs and resumes by "
            "itself.",
            self.directory,
            type(err).__name__,
            err,
            self.interval_s,
        )
        self._probe = self._loop.create_task(self._probe_until_space(), name="disk-space-probe")

    async def _probe_until_space(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                space = await self._loop.run_in_executor(
                    self._executor, has_space, self.directory, self.probe_bytes
                )
            except Exception:  # keep probing: the only way out of the full state
                logger.exception("agents: probing free space in %s failed", self.directory)
                continue
            if space:
                break
        logger.warning(
            "agents: disk space is back in %s after %.1fs full; committing and acknowledging "
            "again (held messages are resubmitted now)",
            self.directory,
            self._loop.time() - self._since,
        )
        self._leave()

    def _leave(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None and not ready.done():
            ready.set_result(None)

    async def close(self) -> None:
        """Stop probing; whoever waits on `ready` is released (a resubmission then meets the
        shutting-down runtime)."""
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        self._leave()
