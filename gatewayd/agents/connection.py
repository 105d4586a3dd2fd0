"""A client or device session as an agent sees it, on any transport.

Connection objects are owned by the runtime, not by the agent instance: they (their tags,
per-connection state and protocol/readonly flags) survive the agent's hibernation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from gatewayd.agents.errors import AgentError, ValueTooLargeError

if TYPE_CHECKING:
    from protocols.link import Link


class CloseRequest:
    """An output that closes a link once the turn has committed."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class OutputGate(Protocol):
    """The agent side a connection writes through (the runtime's `slot.Slot`)."""

    def gate_output(self, conn: Connection, data: bytes | str | CloseRequest) -> bool:
        """Hold `data` until the running batch commits; False when no batch is open."""
        ...

    def note_connection_state(self, conn: Connection, old_state: Any) -> None:
        """Record `old_state` so that a rolled-back turn restores it."""
        ...


class Connection:
    """One session: `id`, `transport`, `tags`, `state`, `send()`, `close()`.

    `send` goes through the output gate: inside a turn the data is released only after the
    turn commits; outside any turn (nothing uncommitted) it is sent at once.
    """

    __slots__ = (
        "_gate",
        "_max_state_bytes",
        "_state",
        "closed",
        "context",
        "link",
        "protocol_enabled",
        "readonly",
        "tags",
    )

    def __init__(self, link: Link, context: dict[str, Any], max_state_bytes: int) -> None:
        self.link = link
        self.context = context
        self.tags: tuple[str, ...] = ()
        self.protocol_enabled = False
        self.readonly = False
        self.closed = False
        self._state: Any = None
        self._max_state_bytes = max_state_bytes
        # Set by the runtime to the agent's slot (also while it hibernates).
        self._gate: OutputGate | None = None

    @property
    def id(self) -> str:
        return self.link.link_id

    @property
    def transport(self) -> str:
        return self.link.transport

    @property
    def remote(self) -> str:
        return self.link.remote

    @property
    def state(self) -> Any:
        """Small JSON-able per-connection state; survives agent hibernation."""
        return self._state

    def set_state(self, new_state: Any) -> None:
        try:
            size = len(json.dumps(new_state, separators=(",", ":")).encode("utf-8"))
        except (TypeError, ValueError) as err:
            raise AgentError(
                f"connection {self.id}: state must be JSON-serialisable: {err}"
            ) from err
        if size > self._max_state_bytes:
            raise ValueTooLargeError(
                f"connection {self.id}: state of {size} bytes exceeds "
                f"agents.max_connection_state_bytes={self._max_state_bytes}"
            )
        if self._gate is not None:
            self._gate.note_connection_state(self, self._state)
        self._state = new_state

    def send(self, data: bytes | str) -> None:
        if not isinstance(data, bytes | str):
            raise TypeError(f"Connection.send takes bytes or str, got {type(data).__name__}")
        self._output(data)

    def send_now(self, data: bytes | str) -> None:
        """Send at once, past the output gate, even while a turn of the agent is open: for
        live data that must not wait for a commit and is stored (or not) by other means (a
        chat's live chunks). Its order relative to gated sends is not kept."""
        if not isinstance(data, bytes | str):
            raise TypeError(f"Connection.send_now takes bytes or str, got {type(data).__name__}")
        deliver(self, data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._output(CloseRequest(code, reason))

    def has_tag(self, tag: str) -> bool:
        return tag in self.tags

    def _set_tags(self, tags: Iterable[str]) -> None:
        self.tags = tuple(str(tag) for tag in tags)

    def _output(self, data: bytes | str | CloseRequest) -> None:
        if self.closed:
            return
        gate = self._gate
        if gate is None or not gate.gate_output(self, data):
            deliver(self, data)

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.transport} {self.remote}>"


def deliver(conn: Connection, data: bytes | str | CloseRequest) -> None:
    """Hand one committed output to the transport."""
    if conn.closed:
        return
    if isinstance(data, CloseRequest):
        conn.closed = True
        conn.link.close(data.code, data.reason)
    else:
        conn.link.send(data)
