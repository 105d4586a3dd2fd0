"""TCP (optionally TLS) listener for binary-frame devices (wire spec: protocols/FRAMES.md).

The asyncio plumbing around `protocols.tcp_session.TcpSession`, which owns the session rules
(HELLO first, seq order and window, liveness, close): each accepted connection feeds its bytes
to a session and acts on the session's events. After the device authenticates
(`protocols.tcp_auth`), the connection becomes a `Link` routed to
`Route(settings.agent_class, device_id)` and its DATA frames are submitted to the `LinkHandler`
in arrival order, pipelined up to the unacked window. An ACK leaves only when the handler's
future resolves (the agent's turn committed): that plus the agent's dedup on
`DedupKey(device_id, seq, resume_seq)` gives exactly-once.

    listener = TcpListener(TcpSettings(port=7878, agent_class="thermostat",
                                       secrets=load_secrets_file("/etc/gatewayd/devices.toml")),
                           handler)
    await listener.start()
    ...
    await listener.stop(drain_timeout_s=10.0)

When the handler answers a DATA frame with `protocols.link.Backpressure` (the agent's mailbox
is full; raised, or as an already failed future), the connection neither ACKs nor errors that
frame: it stops reading the socket and submits the same frame again once `Backpressure.ready`
resolves, so order is kept. A pushed-back `open_link` is retried the same way, within the
hello timeout.

The other direction: while the device owes ACKs for `max_push_backlog` pushes, or while the
transport's send buffer is over its high-water mark (`pause_writing`: the device does not read),
the session holds the device's DATA (`TcpSession.hold_data`: DATA and a CLOSE/ERROR behind it
wait in order, ACK/PING/PONG still pass), so neither the push backlog nor the send buffer
grows with the device's input; the hold ends at half the backlog / `resume_writing`.

Writes are coalesced per commit: when a DATA future resolves, its callback writes the
connection's queue at once, settling first every other DATA of the connection whose future is
done (one commit resolves a batch's futures together, after releasing its pushes), so the
replies and ACKs of one commit leave in one `write`. Small pushes not followed by an ACK wait
for one callback at the end of the iteration (`TcpListener.flush_soon`), which also publishes
the per-frame metrics, counted as ints.

Pushes belong to the device, not to one connection: they are kept until the device ACKs them
and are resent after it reconnects, oldest first, at most `max_pending_pushes` unACKed at a time
(protocols/tcp_pushes.py). The gateway's runtime sends them tracked
(`TcpListener.send_tracked`, `protocols.link.DurableOutputs`): the push seq is the agent's
outbox row id, so it survives a gateway restart (no new epoch: `push_epoch` stays
`DURABLE_PUSH_EPOCH`), the runtime hands undelivered pushes over again after a restart, and the
device's ACK reports them delivered. Nothing is dropped for load: the runtime bounds how many
undelivered outputs an agent may hold. A plain `link.send` (a handler without an outbox) gets
the next seq after the highest one this process has seen for the device, in memory only.
`close_link` is called exactly once for each link whose `open_link` did not fail
(also when the connection ends while the open is still pending), with the close code: the code
from the device's CLOSE, the ErrorCode the gateway failed it with, or 1006 when the connection
dropped without a CLOSE.

This module must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import Counter, Gauge

from protocols.frames import (
    MIN_FRAME_BYTES,
    Data,
    ErrorCode,
    FrameDecoder,
    FrameError,
    FrameType,
    Hello,
)
from protocols.link import (
    Backpressure,
    DedupKey,
    DeliveredCallback,
    LinkHandler,
    LinkIdentity,
    LinkRejected,
    Outcome,
    OutputAddress,
    Route,
    TransportStats,
    attach_outputs,
    detach_outputs,
)
from protocols.tcp_auth import Authenticator, AuthFailureLimiter, AuthResult
from protocols.tcp_metrics import COUNTS
from protocols.tcp_pushes import DURABLE_PUSH_EPOCH, PushOutbox
from protocols.tcp_secrets import SecretsFileError, load_secrets_file
from protocols.tcp_session import (
    CONNECTION_LOST_CODE,
    DataReceived,
    Event,
    HelloReceived,
    PeerClosing,
    PushAcked,
    SessionFailed,
    SessionState,
    SettleTimedOut,
    TcpSession,
)
from protocols.tcp_settings import TcpSettings

__all__ = [
    "CONNECTION_LOST_CODE",
    "SecretsFileError",
    "TcpLink",
    "TcpListener",
    "TcpSettings",
    "load_secrets_file",
]

logger = logging.getLogger(__name__)

TRANSPORT = "tcp"

# A shutting-down handler refuses with this code (WebSocket's "going away"): the frame is not
# refused for good, so the device must keep it and resend it (NOT_APPLIED, not REJECTED).
_GOING_AWAY_CODE = 1001

# A push at least this large is written at once; smaller ones wait for the end of the loop
# iteration, to leave in one write with the other pushes and the ACKs of the same commit.
_WRITE_NOW_BYTES = 16 * 1024

TCP_CONNECTIONS = Gauge("gatewayd_tcp_connections", "Open TCP frame connections (any state)")
# gatewayd_tcp_frames_received_total and gatewayd_tcp_data_outcomes_total: tcp_metrics.py.
TCP_PROTOCOL_ERRORS = Counter(
    "gatewayd_tcp_protocol_errors_total", "Connections failed by the gateway", ["code"]
)
TCP_AUTH_FAILURES = Counter("gatewayd_tcp_auth_failures_total", "Failed or rate-limited HELLOs")
TCP_PUSHES = Counter(
    "gatewayd_tcp_pushes_total", "PUSH frames (sent, resent, oversized, acked)", ["event"]
)
TCP_BACKPRESSURE_PAUSES = Counter(
    "gatewayd_tcp_backpressure_pauses_total",
    "Times a connection stopped reading because its agent's mailbox was full",
)


class TcpLink(LinkIdentity):
    """The `protocols.link.Link` of one authenticated TCP connection."""

    TRANSPORT = TRANSPORT

    def __init__(self, connection: _DeviceConnection, link_id: str, device_id: str) -> None:
        route = Route(connection.listener.settings.agent_class, device_id)
        super().__init__(link_id, route, connection.remote)
        self._connection = connection

    @property
    def device_id(self) -> str:
        return self._route.agent_id

    @property
    def output_address(self) -> OutputAddress:
        return OutputAddress(TRANSPORT, self.device_id)

    @property
    def outputs(self) -> TcpListener:
        return self._connection.listener

    def send(self, data: bytes | str) -> None:
        """Queue a PUSH for the device (text is sent UTF-8 encoded); never blocks."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._connection.listener.push(self.device_id, payload)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._connection.close_after_settling(code, reason)

    def __repr__(self) -> str:
        return f"<TcpLink {self._link_id} device={self.device_id!r} remote={self.remote}>"


class _DeviceConnection(asyncio.Protocol):
    """One TCP connection: a `TcpSession` driven by the transport, the timer and the handler."""

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.settings = listener.settings
        self._loop = asyncio.get_running_loop()
        self.session = TcpSession(self.settings, self._loop.time(), on_frame=listener.count_frame)
        self._transport: asyncio.Transport | None = None
        self.remote = "?"
        self._remote_ip = "?"
        self.link: TcpLink | None = None
        self._link_released = False
        self._counted_open = False  # links_open counts links that got HELLO_OK
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.flush_pending = False  # in the listener's list of connections to flush
        self._flushing = False  # flush_and_sync is settling done DATA (see _settled)
        # DATA handed to the handler and not settled yet, by seq (see flush_and_sync).
        self._unsettled: dict[int, asyncio.Future[Outcome]] = {}
        # The DATA frame the handler pushed back (Backpressure); reading is paused meanwhile.
        self._held: Data | None = None
        self._reading = True
        # DATA held while the device's pushes or our send buffer are backed up (hold_data).
        self._write_blocked = False  # pause_writing .. resume_writing
        self._pushes_blocked = False  # push backlog over max_push_backlog
        self._run_scheduled = False
        self._open_context: dict[str, Any] = {}
        self._open_held = False  # open_link answered Backpressure; retried when ready
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # Cluster mode (listener.router): the first bytes, held until the HELLO is complete.
        self._first_bytes: bytearray | None = bytearray() if listener.router else None

    @property
    def device_id(self) -> str | None:
        return self.session.device_id

    @property
    def is_open(self) -> bool:
        return self.session.state is SessionState.OPEN

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._remote_ip = str(peer[0])
            self.remote = f"{peer[0]}:{peer[1]}"
        TCP_CONNECTIONS.inc()
        if not self.listener.register(self):
            TCP_PROTOCOL_ERRORS.labels(ErrorCode.SERVER_BUSY.name).inc()
            logger.warning(
                "tcp: refused connection from %s: at the limit of %d connections",
                self.remote,
                self.settings.max_connections,
            )
            self.session.fail(ErrorCode.SERVER_BUSY, "gateway at its connection limit; retry later")
        self._sync()

    def data_received(self, data: bytes) -> None:
        if self._first_bytes is not None:
            data = self._route_first(data)
            if not data:
                return
        self.session.receive_data(data, self._loop.time())
        self._run_session()

    def _route_first(self, data: bytes) -> bytes:
        """Cluster mode: hold the bytes until the HELLO is complete; once it authenticates,
        ask the listener's router. Returns the bytes this connection serves itself (b"": none
        yet, or the connection was handed over)."""
        assert self._first_bytes is not None
        self._first_bytes += data
        held = bytes(self._first_bytes)
        try:
            decoder = FrameDecoder(self.settings.max_frame_bytes)
            decoder.receive_data(held)
            frame = decoder.next_frame()
        except FrameError:
            frame = None
            self._first_bytes = None  # the session reports it
            return held
        if frame is None:
            return b""
        self._first_bytes = None
        router, transport = self.listener.router, self._transport
        if (
            router is None
            or transport is None
            or not isinstance(frame, Hello)
            or self.listener.authenticator.check(frame, self._remote_ip, self._loop.time())
            is not AuthResult.OK
        ):
            return held
        takeover = router(Route(self.settings.agent_class, frame.device_id), transport, held)
        if takeover is None:
            return held
        # Served elsewhere: the router's protocol owns the connection from now on.
        self._cancel_timer()
        self.listener.unregister(self)
        self.listener.stats_extra_inc("routed_elsewhere")
        TCP_CONNECTIONS.dec()
        self._transport = None
        transport.set_protocol(takeover)
        takeover.connection_made(transport)
        if not self.closed.done():
            self.closed.set_result(None)
        return b""

    def eof_received(self) -> bool:
        self.session.receive_eof(self._loop.time())
        self._run_session()
        return True  # keep the write side open until the session is done with it

    def pause_writing(self) -> None:
        """The send buffer is over its high-water mark (the device reads slower than we write):
        accept no more DATA from it until it drains (`resume_writing`)."""
        self._write_blocked = True
        self.listener.stats_extra_inc("write_pauses")
        self._update_data_hold()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_data_hold()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost()
        self._held = None
        self._cancel_timer()
        TCP_CONNECTIONS.dec()
        self.listener.unregister(self)
        self._release_link(self.session.close_code, self.session.close_reason)
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------------------------------ the session's events

    def _run_session_soon(self) -> None:
        if not self._run_scheduled:
            self._run_scheduled = True
            self._loop.call_soon(self._run_session_later)

    def _run_session_later(self) -> None:
        self._run_scheduled = False
        if self.session.state is not SessionState.CLOSED:
            self._run_session()

    def _run_session(self) -> None:
        session = self.session
        while (event := session.next_event()) is not None:
            self._handle(event)
        self._sync()

    def _handle(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            self._submit(event.frame)
        elif isinstance(event, PushAcked):
            assert self.device_id is not None
            if self.listener.push_acked(self.device_id, event.seq):
                TCP_PUSHES.labels("acked").inc()
        elif isinstance(event, HelloReceived):
            self._authenticate(event)
        elif isinstance(event, PeerClosing):
            if event.error:
                logger.warning(
                    "tcp: device %r (%s) reported error %d on seq %d: %s; closing",
                    self.device_id,
                    self.remote,
                    event.code,
                    event.seq,
                    event.reason,
                )
        elif isinstance(event, SessionFailed):
            self._session_failed(event)
        elif isinstance(event, SettleTimedOut):
            logger.warning(
                "tcp: device %r (%s): %d DATA frames still unsettled at close; the device "
                "resends them",
                self.device_id,
                self.remote,
                event.unsettled,
            )

    def _session_failed(self, event: SessionFailed) -> None:
        if event.code is ErrorCode.NOT_APPLIED:  # the agent did not open the link in time
            logger.error(
                "tcp: the agent for device %r did not accept its link within %gs; closing, "
                "the device will retry",
                self.device_id,
                self.settings.hello_timeout_s,
            )
            return
        TCP_PROTOCOL_ERRORS.labels(event.code.name).inc()
        self.listener.stats.rejected += 1
        self.listener.stats_extra_inc("protocol_errors")
        device = f"device {self.device_id!r}" if self.device_id else "unauthenticated"
        logger.warning(
            "tcp: protocol error from %s (%s): %s [%s]; closing",
            self.remote,
            device,
            event.message,
            event.code.name,
        )

    def _authenticate(self, event: HelloReceived) -> None:
        hello = event.hello
        now = self._loop.time()
        listener = self.listener
        result = listener.authenticator.check(hello, self._remote_ip, now)
        if result is AuthResult.RATE_LIMITED:
            TCP_AUTH_FAILURES.inc()
            listener.stats_extra_inc("auth_rate_limited")
            self.session.fail(ErrorCode.RATE_LIMITED, "too many failed HELLOs from this address")
            return
        if result is not AuthResult.OK:
            TCP_AUTH_FAILURES.inc()
            listener.stats.rejected += 1
            listener.stats_extra_inc("auth_failures")
            limiter = listener.authenticator.limiter
            if limiter.record_failure(self._remote_ip, now):
                logger.warning(
                    "tcp: %d failed HELLOs from %s within %.0fs (last: device %r, %s); refusing "
                    "HELLOs from that address until the window passes",
                    limiter.limit,
                    self._remote_ip,
                    limiter.window_s,
                    hello.device_id,
                    result.value,
                )
            elif not limiter.is_limited(self._remote_ip, now):
                logger.warning(
                    "tcp: authentication failed for device %r from %s (%s)",
                    hello.device_id,
                    self.remote,
                    result.value,
                )
            self.session.fail(ErrorCode.AUTH_FAILED, "authentication failed")
            return
        # The session's hello timeout keeps running until HELLO_OK: it also bounds open_link.
        self.session.authenticated()
        listener.claim_device(self)
        self.link = TcpLink(self, listener.next_link_id(), hello.device_id)
        transport = self._transport
        self._open_context = {
            "transport": "tcp",
            "device_id": hello.device_id,
            "remote": self.remote,
            "client": hello.client,
            "tls": transport is not None and transport.get_extra_info("sslcontext") is not None,
            "peercert": transport.get_extra_info("peercert") if transport else None,
        }
        self._open()

    def _open(self) -> None:
        assert self.link is not None
        self._open_held = False
        try:
            opened = self.listener.handler.open_link(self.link, self._open_context)
        except Backpressure as pushed_back:
            self._hold_open(pushed_back)
            return
        except Exception as exc:  # the handler must not take the listener down with it
            logger.exception("tcp: handler.open_link failed for device %r", self.device_id)
            self._forget_link()
            self.session.fail(ErrorCode.NOT_APPLIED, f"could not open the device's agent ({exc})")
            return
        if opened.done() and not opened.cancelled():
            refused = opened.exception()
            if isinstance(refused, Backpressure):
                self._hold_open(refused)
                return
        opened.add_done_callback(self._opened)

    def _hold_open(self, pushed_back: Backpressure) -> None:
        """The agent has no room for the connect event: open again once it has (the hello
        timeout still bounds the wait). Nothing was enqueued, so no close_link is owed yet."""
        self._open_held = True
        logger.debug(
            "tcp: device %r: agent busy (%s); opening its link once it has room",
            self.device_id,
            pushed_back.reason,
        )
        pushed_back.ready.add_done_callback(self._open_when_ready)

    def _open_when_ready(self, _ready: asyncio.Future[None]) -> None:
        if self._open_held and self.session.state is SessionState.OPENING:
            self._open()
            self._sync()

    def _opened(self, opened: asyncio.Future[Outcome]) -> None:
        session = self.session
        if session.state is not SessionState.OPENING:
            return  # closed or replaced meanwhile; close_link was or will be called
        exc = None if opened.cancelled() else opened.exception()
        if opened.cancelled() or exc is not None:
            self._forget_link()
            if isinstance(exc, LinkRejected):
                logger.info(
                    "tcp: agent refused device %r from %s: %s", self.device_id, self.remote, exc
                )
                session.fail(ErrorCode.REJECTED, exc.reason)
            else:
                logger.error(
                    "tcp: opening device %r from %s failed (%r); closing, device will retry",
                    self.device_id,
                    self.remote,
                    exc or "cancelled",
                )
                session.fail(
                    ErrorCode.NOT_APPLIED, "could not open the device's agent; retry later"
                )
            self._sync()
            return
        session.accept(self.listener.push_epoch, self._loop.time())
        self.listener.stats.links_open += 1
        self._counted_open = True
        logger.info(
            "tcp: device %r connected from %s%s%s",
            self.device_id,
            self.remote,
            f" ({session.client})" if session.client else "",
            f", resuming at DATA seq {session.resume_seq}" if session.resume_seq else "",
        )
        assert self.device_id is not None
        for seq, payload, resend in self.listener.pending_pushes(self.device_id):
            self.write_push(seq, payload, resend)
        self.push_backlog_changed(self.listener.push_backlog(self.device_id))
        self._sync()

    # ------------------------------------------------------------ DATA

    def _submit(self, frame: Data) -> None:
        assert self.link is not None and self.device_id is not None
        key = DedupKey(self.device_id, frame.seq, self.session.resume_seq)
        try:
            settled = self.listener.handler.submit_message(self.link, frame.payload, key)
        except Backpressure as pushed_back:
            self._hold(frame, pushed_back)
            return
        except Exception as exc:
            logger.exception("tcp: handler.submit_message failed for device %r", self.device_id)
            settled = self._loop.create_future()
            settled.set_exception(exc)
        if settled.done() and not settled.cancelled():
            refused = settled.exception()
            if isinstance(refused, Backpressure):
                self._hold(frame, refused)
                return
        self._count_in(frame)
        self._unsettled[frame.seq] = settled
        settled.add_done_callback(functools.partial(self._settled, frame.seq))

    def _count_in(self, frame: Data) -> None:
        self.listener.stats.messages_in += 1
        if frame.resend:
            self.listener.stats_extra_inc("data_resent")

    def _hold(self, frame: Data, pushed_back: Backpressure) -> None:
        """The agent has no room: keep the frame, read nothing more until `ready`."""
        self._held = frame
        self.session.pause_input()
        TCP_BACKPRESSURE_PAUSES.inc()
        self.listener.stats_extra_inc("backpressure_pauses")
        self._set_reading(False)
        logger.debug(
            "tcp: device %r: agent busy (%s); holding DATA seq %d and pausing reads",
            self.device_id,
            pushed_back.reason,
            frame.seq,
        )
        pushed_back.ready.add_done_callback(self._ready_again)

    def _ready_again(self, _ready: asyncio.Future[None]) -> None:
        frame = self._held
        if frame is None or self.session.state is SessionState.CLOSED:
            return  # the connection ended meanwhile; the device resends the frame
        self._held = None
        self.session.resume_input(self._loop.time())
        self._submit(frame)
        if self._held is not None:
            return  # pushed back again
        if self.session.accepts_input:
            self._set_reading(True)
        self._run_session()

    def _settled(self, seq: int, settled: asyncio.Future[Outcome]) -> None:
        if self._unsettled.pop(seq, None) is None:
            return  # settled already, by flush_and_sync
        session = self.session
        exc: BaseException | None = (
            asyncio.CancelledError() if settled.cancelled() else settled.exception()
        )
        if exc is None:
            outcome = settled.result()
            listener = self.listener
            listener.count_outcome(outcome)
            if outcome is Outcome.DUPLICATE:
                listener.stats_extra_inc("data_duplicates")
            session.data_applied(seq)
            # Called by the future (its commit resolved it in an earlier callback of the loop):
            # write now, with every other DATA of this connection whose future is done (one
            # commit resolves a batch's futures together, and its pushes are queued before
            # them), so the ACKs of one commit still leave in one write, one loop iteration
            # sooner than at the end of this one (TcpListener.flush_soon), which on a busy loop
            # is a whole iteration of other agents' turns later. Called by flush_and_sync
            # itself: that writes when it is done.
            if not self._flushing:
                self.flush_and_sync()
            return
        if isinstance(exc, LinkRejected) and exc.code != _GOING_AWAY_CODE:
            code, message = ErrorCode.REJECTED, exc.reason
            COUNTS.outcomes["rejected"] += 1
        else:
            code, message = ErrorCode.NOT_APPLIED, "not applied; retransmit after reconnecting"
            COUNTS.outcomes["not_applied"] += 1
        logger.warning(
            "tcp: DATA seq %d from device %r not applied (%r); closing so the device "
            "resends from its oldest unacknowledged frame",
            seq,
            self.device_id,
            exc,
        )
        self.listener.stats_extra_inc("data_not_applied")
        session.data_not_applied(seq, code, message, self._loop.time())
        self._run_session()

    # ------------------------------------------------------------ output, timer, closing

    def _sync(self) -> None:
        """Write what the session queued; close the transport once it is done; re-arm the
        timer for the session's next deadline."""
        self._flush()
        session = self.session
        transport = self._transport
        if session.state is SessionState.CLOSED:
            self._cancel_timer()
            if transport is not None and not transport.is_closing():
                transport.close()
            return
        if not session.accepts_input:
            self._set_reading(False)
        deadline = session.next_deadline()
        # A later deadline is picked up when the earlier timer fires: moving the timer on every
        # frame would cost a heap operation per frame.
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            self._cancel_timer()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._timer_fired)

    def _set_reading(self, reading: bool) -> None:
        transport = self._transport
        if reading == self._reading or transport is None or transport.is_closing():
            return
        self._reading = reading
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        self.session.handle_timeout(self._loop.time())
        self._run_session()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def flush_and_sync(self) -> None:
        """The listener's end-of-iteration flush: write what is queued, then `_sync`.

        DATA whose agent turn committed since the last flush is settled here first, even if
        its future's own callback has not run yet: the runtime releases a batch's outputs
        (pushes, queued here) and then resolves its futures in the same call, so the replies
        and the ACKs of one commit leave in one write. (An ACK still never leaves before its
        future resolved, i.e. before the commit.)"""
        unsettled = self._unsettled
        if unsettled:
            self._flushing = True
            try:
                for seq, future in list(unsettled.items()):
                    if future.done():
                        self._settled(seq, future)
            finally:
                self._flushing = False
        self.flush_pending = False
        if self._transport is not None:
            self._sync()

    def _flush(self) -> None:
        data = self.session.data_to_send()
        transport = self._transport
        if not data or transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.settings.send_buffer_limit_bytes:
            TCP_PROTOCOL_ERRORS.labels(ErrorCode.SLOW_CONSUMER.name).inc()
            self.listener.stats_extra_inc("slow_consumers")
            logger.warning(
                "tcp: device %r (%s) is not reading; send buffer over %d bytes, disconnecting",
                self.device_id,
                self.remote,
                self.settings.send_buffer_limit_bytes,
            )
            self.session.abort(ErrorCode.SLOW_CONSUMER, "not reading")
            transport.abort()

    def write_push(self, seq: int, payload: bytes, resend: bool) -> None:
        if self.session.send_push(seq, payload, resend):
            TCP_PUSHES.labels("resent" if resend else "sent").inc()
            self.listener.stats.messages_out += 1
            if len(payload) >= _WRITE_NOW_BYTES or self.session.queued_frames >= 64:
                self._flush()  # large: not held in memory until the end of the iteration
            elif not self.flush_pending:
                self.listener.flush_soon(self)  # with the ACKs settled meanwhile

    def push_backlog_changed(self, backlog: int) -> None:
        """Backpressure from pushes: while the device owes ACKs for `max_push_backlog` pushes
        or more, accept none of its DATA (each could make its agent push more); accept again
        once it is down to half of that."""
        limit = self.settings.max_push_backlog
        if not self._pushes_blocked and backlog >= limit:
            self._pushes_blocked = True
            self.listener.stats_extra_inc("push_backlog_holds")
            logger.debug(
                "tcp: device %r owes ACKs for %d pushes (max_push_backlog=%d); holding its DATA",
                self.device_id,
                backlog,
                limit,
            )
            self._update_data_hold()
        elif self._pushes_blocked and backlog <= limit // 2:
            self._pushes_blocked = False
            self._update_data_hold()

    def _update_data_hold(self) -> None:
        session = self.session
        if self._write_blocked or self._pushes_blocked:
            session.hold_data()
        elif session.data_held:
            session.release_data()
            # Not from inside whatever called us (possibly this connection's own event loop
            # in _run_session): the kept frames are handed out on the next iteration.
            self._run_session_soon()

    def close_after_settling(self, code: int, reason: str, timeout_s: float | None = None) -> None:
        """Stop reading, wait for in-flight DATA to be ACKed/ERRORed, send CLOSE, close."""
        self.session.close(code, reason, self._loop.time(), timeout_s)
        self._sync()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def replace(self, newer: _DeviceConnection) -> None:
        """A newer connection authenticated as this device: close this one right away."""
        logger.info(
            "tcp: device %r reconnected from %s; closing its older connection from %s",
            self.device_id,
            newer.remote,
            self.remote,
        )
        self.listener.stats_extra_inc("replaced")
        reason = f"replaced by a newer connection from {newer.remote}"
        # The handler must see close_link(old) before open_link(new).
        self._release_link(ErrorCode.REPLACED, reason)
        self.session.replace(reason)
        self._sync()

    def _forget_link(self) -> None:
        """open_link failed: the handler never had this link, so no close_link for it."""
        self._link_released = True
        self.listener.release_device(self)

    def _release_link(self, code: int, reason: str) -> None:
        if self.link is None or self._link_released:
            return
        if self._open_held:  # open_link never took it: no close_link for it
            self._forget_link()
            return
        self._link_released = True
        if self._counted_open:
            self.listener.stats.links_open -= 1
        self.listener.release_device(self)
        try:
            closed = self.listener.handler.close_link(self.link, int(code), reason)
        except Exception:
            logger.exception("tcp: handler.close_link failed for device %r", self.device_id)
            return
        closed.add_done_callback(_log_close_failure)


def _log_close_failure(closed: asyncio.Future[Outcome]) -> None:
    if not closed.cancelled() and closed.exception() is not None:
        logger.warning("tcp: agent's on_close failed: %r", closed.exception())


class TcpListener:
    """Accepts device connections and bridges their frames to a `LinkHandler`."""

    def __init__(
        self,
        settings: TcpSettings,
        handler: LinkHandler,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.ssl_context = ssl_context
        self.stats = TransportStats()
        self.authenticator = Authenticator(
            settings.secrets,
            AuthFailureLimiter(settings.auth_failure_limit, settings.auth_failure_window_s),
        )
        # Push seqs are durable (FRAMES.md 6): the epoch never changes.
        self.push_epoch = DURABLE_PUSH_EPOCH
        self._server: asyncio.Server | None = None
        self._connections: set[_DeviceConnection] = set()
        self._live_by_device: dict[str, _DeviceConnection] = {}
        self._pushes = PushOutbox(settings.max_pending_pushes)
        self._link_ids = itertools.count(1)
        # Cluster mode's routing (gatewayd/cluster/routing.py): called once a connection's
        # HELLO authenticated, with its route, transport and the bytes received so far; None
        # serves the connection here, a protocol takes the connection over (relays it to the
        # member that owns the agent).
        self.router: Callable[[Route, asyncio.Transport, bytes], asyncio.Protocol | None] | None = (
            None
        )
        # Work left for the end of the loop iteration, done by one callback for all
        # connections: their queued ACKs. (The per-frame counters are ints read at scrape
        # time, tcp_metrics.py: nothing to publish, no callback per frame.)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._end_of_iteration_scheduled = False
        self._to_flush: list[_DeviceConnection] = []
        self._frames_by_type = COUNTS.frames_by_type
        self._outcomes = COUNTS.outcomes

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _DeviceConnection(self),
            self.settings.host,
            self.settings.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.settings.hello_timeout_s if self.ssl_context else None,
            reuse_address=True,
            # The kernel's queue of connections not accepted yet holds every connection we
            # allow (capped by net.core.somaxconn). asyncio's default of 100 overflowed when
            # a thousand devices (re)connected at once to a busy loop: the kernel dropped the
            # SYNs and the devices waited for their retransmits, 1, 3, 7 s later.
            backlog=self.settings.max_connections,
        )
        attach_outputs(self.handler, self)
        logger.info(
            "tcp: listening on %s:%d%s for agent class %r (%d devices configured)",
            self.settings.host,
            self.bound_port,
            " with TLS" if self.ssl_context else "",
            self.settings.agent_class,
            len(self.settings.secrets),
        )

    @property
    def bound_port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("tcp listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight DATA settle (up to the timeout), close everything."""
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close_after_settling(
                ErrorCode.GOING_AWAY, "gateway shutting down", timeout_s=drain_timeout_s
            )
        waiting = [c.closed for c in connections if not c.closed.done()]
        if waiting:
            _, still_open = await asyncio.wait(waiting, timeout=drain_timeout_s + 1.0)
            for connection in connections:
                if not connection.closed.done():
                    connection.abort()
            if still_open:
                await asyncio.wait(still_open, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        detach_outputs(self.handler, self)
        logger.info("tcp: listener stopped")

    async def __aenter__(self) -> TcpListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ used by connections

    def register(self, connection: _DeviceConnection) -> bool:
        if len(self._connections) >= self.settings.max_connections:
            return False
        self._connections.add(connection)
        return True

    def unregister(self, connection: _DeviceConnection) -> None:
        self._connections.discard(connection)

    def claim_device(self, connection: _DeviceConnection) -> None:
        assert connection.device_id is not None
        older = self._live_by_device.get(connection.device_id)
        self._live_by_device[connection.device_id] = connection
        if older is not None and older is not connection:
            older.replace(connection)

    def release_device(self, connection: _DeviceConnection) -> None:
        device_id = connection.device_id
        if device_id is not None and self._live_by_device.get(device_id) is connection:
            del self._live_by_device[device_id]

    def count_frame(self, frame_type: FrameType) -> None:
        self._frames_by_type[frame_type] += 1

    def count_outcome(self, outcome: Outcome) -> None:
        # By identity: hashing an Enum member runs Python.
        self._outcomes["applied" if outcome is Outcome.APPLIED else "duplicate"] += 1

    def flush_soon(self, connection: _DeviceConnection) -> None:
        """Write `connection`'s queued frames at the end of this loop iteration."""
        connection.flush_pending = True
        self._to_flush.append(connection)
        if not self._end_of_iteration_scheduled:
            self._schedule_end_of_iteration()

    def _schedule_end_of_iteration(self) -> None:
        self._end_of_iteration_scheduled = True
        loop = self._loop or asyncio.get_running_loop()
        loop.call_soon(self._end_of_iteration)

    def _end_of_iteration(self) -> None:
        self._end_of_iteration_scheduled = False
        to_flush, self._to_flush = self._to_flush, []
        for connection in to_flush:
            connection.flush_and_sync()

    def next_link_id(self) -> str:
        return f"tcp-{next(self._link_ids)}"

    def stats_extra_inc(self, name: str) -> None:
        self.stats.extra[name] = self.stats.extra.get(name, 0) + 1

    @property
    def transport(self) -> str:
        return TRANSPORT

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None:
        """`protocols.link.DurableOutputs`: PUSH `payload` with `seq` to device
        `address.target` now if it is connected (and the push window has room), else later;
        `on_delivered(seq)` when the device ACKs it."""
        self._push(address.target, payload, seq, on_delivered)

    def push(self, device_id: str, payload: bytes) -> None:
        """An untracked push (memory only; see the module docstring)."""
        self._push(device_id, payload, None, None)

    def _push(
        self,
        device_id: str,
        payload: bytes,
        seq: int | None,
        on_delivered: DeliveredCallback | None,
    ) -> None:
        limit = self.settings.max_frame_bytes - MIN_FRAME_BYTES - 5  # 5: CBOR bstr header
        if len(payload) > limit:
            TCP_PUSHES.labels("oversized").inc()
            logger.error(
                "tcp: a %d-byte push to device %r is over the %d-byte payload limit of "
                "max_frame_bytes and can never be sent; dropped (send less, or raise the limit)",
                len(payload),
                device_id,
                limit,
            )
            if on_delivered is not None and seq is not None:
                on_delivered(seq)
            return
        if seq is None:
            self._pushes.add(device_id, payload)
        else:
            self._pushes.add_tracked(device_id, seq, payload, on_delivered)
        self._write_pushes(device_id)

    def pending_pushes(self, device_id: str) -> list[tuple[int, bytes, bool]]:
        """For a connection that just opened: the oldest unACKed pushes, at most
        `max_pending_pushes` (the push window), as (seq, payload, sent before)."""
        return self._pushes.reopen(device_id)

    def push_acked(self, device_id: str, seq: int) -> bool:
        if not self._pushes.ack(device_id, seq):
            return False
        self._write_pushes(device_id)
        return True

    def held_frames(self, device_id: str) -> int:
        """Frames the device's live connection received and holds back while its pushes or
        send buffer are backed up (0 without a live connection)."""
        live = self._live_by_device.get(device_id)
        return 0 if live is None else live.session.held_frames

    def push_backlog(self, device_id: str) -> int:
        """Pushes the device has not ACKed yet (written or waiting for the window)."""
        return self._pushes.backlog(device_id)

    def _write_pushes(self, device_id: str) -> None:
        """Fill the push window of the device's open connection, if it has one, and hold or
        release its DATA by its push backlog."""
        live = self._live_by_device.get(device_id)
        if live is not None and live.is_open:
            for seq, payload, resend in self._pushes.take_window(device_id):
                live.write_push(seq, payload, resend)
            live.push_backlog_changed(self._pushes.backlog(device_id))
