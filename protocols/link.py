"""The contract between a transport and the gateway that consumes it.

A transport (WebSocket, TCP binary frames, MQTT) turns each device or client session into a
`Link` and reports what happens on it to a `LinkHandler` (implemented by the gateway's agent
runtime). The handler's methods enqueue synchronously, in call order, and return a future that
resolves once the agent's turn that consumed the event has *committed* (the output gate): only
then may the transport acknowledge the event to the device or broker.

Outputs (agent -> device) come in two kinds. A plain `Link.send` is *live*: the transport
delivers it if it can (WebSocket dashboards). A transport whose links have a `DurableLink`
address (MQTT, TCP) also implements `DurableOutputs`: the gateway first writes each output to
the agent's outbox table in the turn's own transaction, then hands it over with
`send_tracked(address, seq, payload, on_delivered)`; the transport calls `on_delivered(seq)`
once the device side has it (MQTT: PUBACK for QoS 1, handed to the socket for QoS 0; TCP: the
device's push ACK), and only then does the gateway delete the row. A transport never drops a
tracked output because it is busy: it keeps it and pushes back on its own input instead (stops
reading or acknowledging device messages) until it has room. After a restart the gateway
hands the undelivered rows over again, in seq order per address, through the transport's
`DurableOutputs` (it announces itself with `OutputRecovery.attach_outputs` on start).

This module has no dependencies besides the standard library.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
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


@dataclass(frozen=True, slots=True)
class OutputAddress:
    """Where a durable output goes, independent of any live session (so that it can be sent
    again after a restart, before the device reconnects).

    `transport` names the `DurableOutputs` that delivers it ("mqtt", "tcp"); `target` is the
    MQTT topic or the TCP device id; `qos` is the MQTT QoS (0 or 1; unused by TCP).
    """

    transport: str
    target: str
    qos: int = 1


DeliveredCallback = Callable[[int], None]
"""Called with an output's `seq` once the transport delivered it (or dropped it under an
explicit, documented per-route overflow policy): the gateway may then forget the output."""


class DurableOutputs(Protocol):
    """A transport that can track outputs until they are delivered (MQTT, TCP).

    `send_tracked` never blocks and never drops an output because the transport is busy: the
    transport keeps it (in memory; the gateway keeps it on disk), resends it across reconnects
    in `seq` order per address, and calls `on_delivered(seq)` exactly once when it is done. An
    output is dropped only under an explicit per-route policy (then `on_delivered` is called
    too, and the drop is counted and logged) or when it can never be delivered (e.g. larger
    than the transport allows; logged as an error). When its outbound capacity is exhausted
    the transport applies backpressure upstream: it stops reading or acknowledging new device
    messages until the backlog shrinks. `seq` increases with each output of one agent and
    survives restarts (gaps allowed): the TCP transport uses it as the PUSH seq.
    """

    @property
    def transport(self) -> str: ...

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None: ...


class DurableLink(Protocol):
    """A `Link` whose outputs are durable: they go to `output_address` through `outputs`."""

    @property
    def output_address(self) -> OutputAddress: ...

    @property
    def outputs(self) -> DurableOutputs: ...


def durable_target(link: Link) -> tuple[DurableOutputs, OutputAddress] | None:
    """`(outputs, address)` for a link with durable outputs, None for a live-only link."""
    address = getattr(link, "output_address", None)
    outputs = getattr(link, "outputs", None)
    if isinstance(address, OutputAddress) and outputs is not None:
        return outputs, address
    return None


class OutputRecovery(Protocol):
    """Optional half of a `LinkHandler` that keeps durable outputs (the gateway's runtime).

    A transport implementing `DurableOutputs` calls `attach_outputs(self)` when it starts and
    `detach_outputs(self)` when it stops. On attach the handler hands it the outputs left
    undelivered by an earlier run or by a stopped transport of the same name, in seq order per
    address; after detach it ignores that transport's late delivery reports (at least once).
    """

    def attach_outputs(self, outputs: DurableOutputs) -> None: ...

    def detach_outputs(self, outputs: DurableOutputs) -> None: ...


def attach_outputs(handler: object, outputs: DurableOutputs) -> None:
    """Announce `outputs` to `handler` if it keeps durable outputs (see `OutputRecovery`)."""
    attach = getattr(handler, "attach_outputs", None)
    if attach is not None:
        attach(outputs)


def detach_outputs(handler: object, outputs: DurableOutputs) -> None:
    detach = getattr(handler, "detach_outputs", None)
    if detach is not None:
        detach(outputs)


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
