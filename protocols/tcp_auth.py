"""Who may open a TCP session: device secrets, and a per-address limit on failed HELLOs.

Sans-I/O like `protocols.tcp_session`: the caller passes the time in; nothing here logs,
sleeps or touches a socket.

This module must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

import enum
import hmac
from collections import OrderedDict, deque
from collections.abc import Mapping

from protocols.frames import Hello

# Compared against for unknown ids too, so the time taken does not reveal which ids exist.
_UNKNOWN_DEVICE_SECRET = "\x00unknown-device"


class AuthResult(enum.Enum):
    OK = "ok"
    RATE_LIMITED = "rate limited"  # checked first: a limited address learns nothing more
    UNKNOWN_DEVICE = "unknown device id"
    WRONG_SECRET = "wrong secret"


class AuthFailureLimiter:
    """Counts failed HELLOs per remote IP in a sliding window (bounded number of IPs)."""

    MAX_TRACKED_IPS = 10_000

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, ip: str, now: float) -> deque[float] | None:
        times = self._failures.get(ip)
        if times is not None:
            while times and now - times[0] >= self.window_s:
                times.popleft()
            if not times:
                del self._failures[ip]
                return None
        return times

    def is_limited(self, ip: str, now: float) -> bool:
        times = self._recent(ip, now)
        return times is not None and len(times) >= self.limit

    def record_failure(self, ip: str, now: float) -> bool:
        """Record one failure; True when this failure reached the limit."""
        times = self._recent(ip, now)
        if times is None:
            times = self._failures[ip] = deque()
            if len(self._failures) > self.MAX_TRACKED_IPS:
                self._failures.popitem(last=False)
        self._failures.move_to_end(ip)
        times.append(now)
        return len(times) == self.limit


class Authenticator:
    """Checks a HELLO's credentials; failures count against the remote address."""

    def __init__(self, secrets: Mapping[str, str], limiter: AuthFailureLimiter) -> None:
        self._secrets = secrets
        self.limiter = limiter

    def check(self, hello: Hello, remote_ip: str, now: float) -> AuthResult:
        if self.limiter.is_limited(remote_ip, now):
            return AuthResult.RATE_LIMITED
        expected = self._secrets.get(hello.device_id)
        candidate = expected if expected is not None else _UNKNOWN_DEVICE_SECRET
        secret_ok = hmac.compare_digest(candidate.encode(), hello.secret.encode())
        if expected is not None and secret_ok:
            return AuthResult.OK
        return AuthResult.UNKNOWN_DEVICE if expected is None else AuthResult.WRONG_SECRET
