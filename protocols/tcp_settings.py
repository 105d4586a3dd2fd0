"""Settings of the TCP binary-frame listener (`protocols.tcp.TcpListener`).

Plain types, so the daemon's config layer can build them. The defaults are the config model's
(`gatewayd.config`'s `[listeners.binary]`), so a listener built without the daemon behaves like
one built from an empty config section.

This module must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from protocols.frames import DEFAULT_MAX_FRAME_BYTES

DEFAULT_PORT = 7878
DEFAULT_MAX_UNACKED_WINDOW = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpSettings:
    """Listener settings; validated on construction (ValueError names the setting).
    `agent_class` (the route) is required, as in the config; everything else has its default."""

    agent_class: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # device id -> pre-shared secret (see protocols.tcp_secrets); kept out of repr.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_unacked_window: int = DEFAULT_MAX_UNACKED_WINDOW
    max_connections: int = 10_000
    hello_timeout_s: float = 10.0
    ping_interval_s: float = 30.0
    ping_timeout_s: float = 10.0
    # How long a closing connection waits for its in-flight DATA to settle (ACK or ERROR).
    settle_timeout_s: float = 10.0
    send_buffer_limit_bytes: int = 1024 * 1024
    max_pending_pushes: int = 256
    # Pushes a device may owe ACKs for (written or waiting) before the gateway stops accepting
    # its DATA (each could make its agent push more); accepted again at half of it.
    max_push_backlog: int = 1024
    auth_failure_limit: int = 10
    auth_failure_window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"tcp port must be 0..65535, got {self.port}")
        if not self.agent_class:
            raise ValueError("tcp agent_class must not be empty")
        if self.max_frame_bytes < 256:
            raise ValueError(f"tcp max_frame_bytes must be >= 256, got {self.max_frame_bytes}")
        for name in (
            "max_unacked_window",
            "max_connections",
            "max_pending_pushes",
            "max_push_backlog",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"tcp {name} must be >= 1, got {getattr(self, name)}")
        if self.auth_failure_limit < 1:
            raise ValueError(f"tcp auth_failure_limit must be >= 1, got {self.auth_failure_limit}")
        for name in (
            "hello_timeout_s",
            "ping_interval_s",
            "ping_timeout_s",
            "settle_timeout_s",
            "auth_failure_window_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"tcp {name} must be > 0 seconds, got {getattr(self, name)}")
        if self.send_buffer_limit_bytes < self.max_frame_bytes:
            raise ValueError(
                f"tcp send_buffer_limit_bytes ({self.send_buffer_limit_bytes}) must be >= "
                f"max_frame_bytes ({self.max_frame_bytes})"
            )
