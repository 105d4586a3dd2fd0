"""The contract between a transport and the gateway that consumes it.

A transport (WebSocket, TCP binary frames, MQTT) turns each device or client session into a
`Link` and reports what happens on it to a `LinkHandler` (implemented by the gateway's agent
runtime). The handler's methods enqueue synchronously, in call order, and return a future that
resolves once the agent's turn that consumed the event has *committed* (the output gate): only
then may the transport acknowledge the event to the device or broker.

This module has no dependencies besides the standard library.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Route:
    """Which agent a link talks to: `(agent_class, agent_id)`."""

    agent_class: str
    agent_id: str


@dataclass(frozen=True, slots=True)
class DedupKey:
    """Identifies an inbound message for exactly-once application.

    `stream` names a sender's sequence space (e.g. the TCP device id); `seq` increases by one
    per new message on that stream. The gateway records the last applied `seq` per stream in the
    agent's own transaction, so a message with `seq <= last applied` is a retransmission and is
    not applied again (its future resolves with `Outcome.DUPLICATE`). A `seq` above
    `last applied + 1` is not applied while an earlier seq is missing (the handler fails it and
    the sender resends in order), unless the sender declared with `resume_seq` that it resumes
    there: it holds nothing below `resume_seq` any more (e.g. a device that reserves seqs in
    blocks rebooted), so the unapplied seqs below it are skipped for good; the jump is recorded
    when `seq` commits. 0 = nothing declared.
    """

    stream: str
    seq: int
    resume_seq: int = 0


class Outcome(enum.Enum):
    """How an inbound event ended; any failure is raised from the future instead."""

    APPLIED = "applied"  # a turn ran and committed
    DUPLICATE = "duplicate"  # already applied earlier (DedupKey); safe to acknowledge again


class Link(Protocol):
    """One device or client session on some transport, as the gateway sees it.

    Implemented by each transport. `send` never blocks: the transport owns a bounded outbound
    buffer and its own policy when it overflows (disconnect a slow peer, or count and log).
    """

    @property
    def transport(self) -> str:  # "ws" | "tcp" | "mqtt"
        ...

    @property
    def link_id(self) -> str:  # unique within this gateway process
        ...

    @property
    def route(self) -> Route: ...

    @property
    def remote(self) -> str:  # peer address or topic, for log lines
        ...

    def send(self, data: bytes | str) -> None:
        """Queue `data` for the peer; called only after the turn's commit."""

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the session from the gateway side (idempotent)."""


class LinkIdentity:
    """The identity half of a `Link`, shared by every transport's link class: which transport,
    which session, which agent, which peer. Subclasses set `TRANSPORT` and add send/close."""

    TRANSPORT: str = ""
    __slots__ = ("_link_id", "_remote", "_route")

    def __init__(self, link_id: str, route: Route, remote: str) -> None:
        self._link_id = link_id
        self._route = route
        self._remote = remote

    @property
    def transport(self) -> str:
        return self.TRANSPORT

    @property
    def link_id(self) -> str:
        return self._link_id

    @property
    def route(self) -> Route:
        return self._route

    @property
    def remote(self) -> str:
        return self._remote


class LinkHandler(Protocol):
    """What a transport calls; implemented by the gateway's agent runtime.

    All three methods enqueue an event for `link.route`'s agent before returning, so events from
    one link reach the agent in call order. Futures raise `LinkRejected` when the agent refuses
    the event (unknown agent class, connection refused) and any other exception when the turn or
    its commit failed — in which case the event must not be acknowledged.
    """

    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        """A new session: runs the agent's `on_connect`. `context` carries transport facts
        (headers, path, client certificate, device id) that the agent's hooks may read."""
        ...

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        """An inbound message: runs `on_message`; resolves after the commit."""
        ...

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        """The session ended (either side): runs `on_close`."""
        ...


class LinkRejected(Exception):
    """The gateway refused a link or an event; `reason` is safe to show to the peer."""

    def __init__(self, reason: str, *, code: int = 1008) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Backpressure(Exception):
    """The agent cannot take this event now (its mailbox is full); nothing was enqueued.

    Not a rejection: the transport must not acknowledge the event, should stop reading new
    input for the link (or the whole transport) and resubmit the same event once `ready`
    resolves. `ready` resolves (never raises) when the agent has room again or the handler
    is shutting down (a resubmission then fails with `LinkRejected("shutting down")`).
    """

    def __init__(self, reason: str, ready: asyncio.Future[None]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ready = ready


@dataclass(slots=True)
class TransportStats:
    """Counters every transport exposes for metrics and systemd STATUS= lines."""

    links_open: int = 0
    messages_in: int = 0
    messages_out: int = 0
    rejected: int = 0
    extra: dict[str, int] = field(default_factory=dict)
