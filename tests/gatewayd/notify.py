"""A real systemd-notify receiver for tests: an AF_UNIX datagram socket standing in for PID 1."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


class NotifySocket:
    """Binds a datagram socket; `env` points a child's NOTIFY_SOCKET at it."""

    def __init__(self, directory: Path, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"gatewayd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def _receive(self, timeout_s: float) -> bool:
        self.sock.settimeout(max(timeout_s, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return True

    def wait_for(
        self, key: str, value: str | None = None, *, timeout_s: float = 15.0, after: int = 0
    ) -> dict[str, str]:
        """The first message (index >= after) carrying `key` (with `value`), waiting if needed."""
        deadline = time.monotonic() + timeout_s
        index = after
        while True:
            while index < len(self.messages):
                fields = self.messages[index][1]
                index += 1
                if key in fields and (value is None or fields[key] == value):
                    return fields
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [m[1] for m in self.messages]
                raise AssertionError(f"no {key}={value or '*'} within {timeout_s}s; got {seen}")
            self._receive(remaining)

    def collect(self, duration_s: float) -> None:
        deadline = time.monotonic() + duration_s
        while (remaining := deadline - time.monotonic()) > 0:
            self._receive(remaining)

    def close(self) -> None:
        self.sock.close()
