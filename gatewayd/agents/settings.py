"""Settings of the agent runtime (a frozen dataclass the daemon's config layer builds)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

Durability = Literal["normal", "full"]

GIB = 1024**3


def _default_protocol_messages() -> Mapping[str, bool]:
    # JSON-speaking WebSocket clients get protocol frames; binary/MQTT devices do not.
    return MappingProxyType({"ws": True, "tcp": False, "mqtt": False})


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """How the agent runtime stores, schedules and evicts agents.

    `durability`:
      - "normal": WAL + synchronous=NORMAL. A commit is durable against a crash of the
        process, but the last commits may be lost on a power cut (see DURABILITY.md).
      - "full": WAL + synchronous=FULL. Every commit is fsynced before any output or ack is
        released.
    """

    state_dir: Path
    durability: Durability = "normal"
    hibernate_after_s: float = 10.0
    max_active_agents: int = 10_000
    turn_timeout_s: float = 30.0
    max_db_bytes: int = 1 * GIB
    max_value_bytes: int = 2_000_000
    max_connection_state_bytes: int = 16_384
    protocol_messages_default: Mapping[str, bool] = field(
        default_factory=_default_protocol_messages
    )
    max_message_bytes: int = 1_048_576
    # Consecutive queued events of one agent share one commit, up to this many turns.
    max_turns_per_commit: int = 256
    # Threads shared by all agents for commits (fsync); never one per agent.
    commit_threads: int = 4
    # Events waiting in one agent's mailbox; beyond it transports get `Backpressure` and
    # `call()` gets `MailboxFullError` (nothing is queued without bound).
    max_mailbox_events: int = 1000
    # In-process calls (`submit_call`, `call`, `run_in_agent`) not yet answered, all agents.
    max_pending_calls: int = 10_000
    # Outputs for devices (MQTT replies, TCP pushes) one agent may hold undelivered (they are
    # rows of its outbox); past that its turns that send fail (OutboxFullError), see outbox.py.
    max_undelivered_outputs: int = 10_000

    def __post_init__(self) -> None:
        if self.durability not in ("normal", "full"):
            raise ValueError(
                f"agents.durability must be 'normal' or 'full', got {self.durability!r}"
            )
        for name in ("hibernate_after_s", "turn_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"agents.{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "max_active_agents",
            "max_db_bytes",
            "max_value_bytes",
            "max_connection_state_bytes",
            "max_message_bytes",
            "max_turns_per_commit",
            "commit_threads",
            "max_mailbox_events",
            "max_pending_calls",
            "max_undelivered_outputs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"agents.{name} must be >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.state_dir, Path):
            object.__setattr__(self, "state_dir", Path(self.state_dir))

    def protocol_default(self, transport: str) -> bool:
        """Whether a new connection on `transport` gets JSON protocol frames by default."""
        return bool(self.protocol_messages_default.get(transport, False))
