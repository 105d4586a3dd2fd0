"""Many TCP connects at once while the event loop is blocked: how many the kernel completes."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import pytest


def skip_unless_somaxconn_allows(count: int) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < count:
        pytest.skip(
            f"net.core.somaxconn is {somaxconn}: the kernel caps every listen queue below the "
            f"{count} connects this test storms with, so it would measure the cap, not the "
            f"gateway (`sysctl -w net.core.somaxconn={count}` to include it)"
        )


def connect_storm(port: int, count: int) -> int:
    """Start `count` connects to 127.0.0.1:`port` and wait (blocking: the caller's loop, and
    the listener on it, accept nothing meanwhile) up to 0.5 s for the kernel to complete
    them into the listen queue; the number completed without error."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        pending = set(sockets)
        deadline = time.monotonic() + 0.5  # loopback handshakes take microseconds
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.05)
            pending.difference_update(writable)
        return sum(
            1
            for s in sockets
            if s not in pending and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        )
    finally:
        for sock in sockets:
            sock.close()
