"""systemd's notify protocol, spoken directly: one datagram of `KEY=value` lines to the AF_UNIX
socket named by `$NOTIFY_SOCKET` (a leading `@` means the abstract namespace).

Without `$NOTIFY_SOCKET` (not started by systemd) every call is a cheap no-op, so the daemon
calls it unconditionally. Also reads the watchdog contract from `$WATCHDOG_USEC`/`$WATCHDOG_PID`.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager; `enabled` is False outside systemd."""

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        if address:
            # Abstract namespace: '@name' on the wire is a leading NUL byte.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop on a busy or wedged receiver: a full datagram queue
            # would otherwise stall every device until the service manager caught up.
            self._socket.setblocking(False)

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. `notify(READY=1, STATUS="serving")`; False when not delivered."""
        if self._socket is None or self._address is None:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(payload, self._address)
        except BlockingIOError:
            log.debug("systemd notify queue full; dropped %s", ",".join(fields))
            return False
        except OSError as err:
            log.warning("systemd notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), err)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def reloading(self) -> bool:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_s() -> float | None:
    """Half of `$WATCHDOG_USEC` when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2
