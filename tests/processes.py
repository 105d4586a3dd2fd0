"""The processes a test run started, found through /proc, and how to stop them for good.

Used by the per-test guard in conftest (a test must not leave a process behind) and by the
watchdog (a run stopped for hanging kills everything it started). Linux only: elsewhere no
process is found and nothing is killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from pathlib import Path

PROC = Path("/proc")


def descendants(root_pid: int | None = None) -> list[int]:
    """Every live process below `root_pid` (default: this one), children before grandchildren."""
    root = os.getpid() if root_pid is None else root_pid
    children: dict[int, list[int]] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                children.setdefault(int(ppid), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def command_line(pid: int) -> str:
    """What `pid` runs, for a message ("?" once it is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its parent to reap it."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_exited(pids: list[int], timeout_s: float) -> list[int]:
    """Wait, up to `timeout_s`, for each of `pids` to exit (a zombie counts as exited); return
    those still running. Woken by the kernel when a process exits (a pidfd per process turns
    readable then), so nothing polls on a timer."""
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fd = os.pidfd_open(pid)
                fds[fd] = pid
                poller.register(fd, select.POLLIN)
        alive = [pid for pid in pids if running(pid)]
        while alive and (left := deadline - time.monotonic()) > 0:
            for fd, _event in poller.poll(left * 1000):
                poller.unregister(fd)
            alive = [pid for pid in alive if running(pid)]
        return alive
    finally:
        for fd in fds:
            os.close(fd)


def left_running(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """Those of `pids` still running, less those on their way out.

    A process that is exiting has already released its memory, and with it its command line
    (read as "?"), but is not a zombie yet: such a one (a daemon or sandbox worker just
    killed, say) is waited for, up to `timeout_s`, rather than taken for one left running.
    """
    wait_exited([pid for pid in pids if running(pid) and command_line(pid) == "?"], timeout_s)
    return [pid for pid in pids if running(pid)]


def kill_and_wait(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """SIGKILL `pids` and wait until each has died; return those still running at the deadline.

    A dead child stays a zombie until its owner (a Popen, asyncio's child watcher) reaps it;
    it is not reaped here, so that owner still gets its exit status.
    """
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return wait_exited(pids, timeout_s)
