"""TCP (optionally TLS) listener for binary-frame devices (wire spec: protocols/FRAMES.md).

Each accepted connection feeds `protocols.frames.FrameDecoder`; after the device authenticates
in its HELLO, the connection becomes a `Link` routed to `Route(settings.agent_class, device_id)`
and its DATA frames are submitted to the `LinkHandler` in arrival order, pipelined up to the
unacked window. An ACK leaves only when the handler's future resolves (the agent's turn
committed): that plus the agent's dedup on `DedupKey(device_id, seq)` gives exactly-once.

    listener = TcpListener(TcpSettings(port=7700, agent_class="thermostat",
                                       secrets=load_secrets_file("/etc/gatewayd/devices.toml")),
                           handler)
    await listener.start()
    ...
    await listener.stop(drain_timeout_s=10.0)

Pushes belong to the device, not to one connection: they are kept until the device ACKs them
and are resent after it reconnects. The gateway's runtime sends them tracked
(`TcpListener.send_tracked`, `protocols.link.DurableOutputs`): the push seq is the agent's
outbox row id, so it survives a gateway restart (no new epoch: `push_epoch` stays
`DURABLE_PUSH_EPOCH`), the runtime hands undelivered pushes over again after a restart, and the
device's ACK reports them delivered. Nothing is dropped for load: the runtime bounds how many
undelivered outputs an agent may hold. A plain `link.send` (a handler without an outbox) gets
the next seq after the highest one this process has seen for the device, in memory only. `close_link` is called exactly once for each link whose `open_link` did not fail
(also when the connection ends while the open is still pending), with the close code: the code
from the device's CLOSE, the ErrorCode the gateway failed it with, or 1006 when the connection
dropped without a CLOSE.

This module must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hmac
import itertools
import logging
import os
import ssl
import stat
import tomllib
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import Counter, Gauge

from protocols.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    Ack,
    Close,
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Hello,
    HelloOk,
    Ping,
    Pong,
    Push,
    encode,
)
from protocols.link import (
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
from protocols.tcp_pushes import DURABLE_PUSH_EPOCH, PushOutbox

logger = logging.getLogger(__name__)

TRANSPORT = "tcp"
CONNECTION_LOST_CODE = 1006  # close_link code when the TCP connection ended without a CLOSE

TCP_CONNECTIONS = Gauge("gatewayd_tcp_connections", "Open TCP frame connections (any state)")
TCP_FRAMES_RECEIVED = Counter(
    "gatewayd_tcp_frames_received_total", "Frames received from devices", ["type"]
)
TCP_DATA_OUTCOMES = Counter(
    "gatewayd_tcp_data_outcomes_total",
    "DATA frames by outcome (applied, duplicate, not_applied, rejected)",
    ["outcome"],
)
TCP_PROTOCOL_ERRORS = Counter(
    "gatewayd_tcp_protocol_errors_total", "Connections failed by the gateway", ["code"]
)
# Label children resolved once: these are touched for every frame.
_FRAMES_RECEIVED_BY_TYPE = {t: TCP_FRAMES_RECEIVED.labels(t.name) for t in FrameType}
_DATA_OUTCOME_BY_VALUE = {o: TCP_DATA_OUTCOMES.labels(o.value) for o in Outcome}
TCP_AUTH_FAILURES = Counter("gatewayd_tcp_auth_failures_total", "Failed or rate-limited HELLOs")
TCP_PUSHES = Counter(
    "gatewayd_tcp_pushes_total", "PUSH frames (sent, resent, oversized, acked)", ["event"]
)


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """Listener settings; plain types so the daemon's TOML layer can build them."""

    host: str = "0.0.0.0"
    port: int = 7700
    agent_class: str = "device"
    # device id -> pre-shared secret (see load_secrets_file); kept out of repr.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_unacked_window: int = 32
    max_connections: int = 1024
    hello_timeout_s: float = 10.0
    ping_interval_s: float = 30.0
    ping_timeout_s: float = 10.0
    # How long a closing connection waits for its in-flight DATA to settle (ACK or ERROR).
    settle_timeout_s: float = 10.0
    send_buffer_limit_bytes: int = 1024 * 1024
    # Push window: pushes written to a device and not ACKed yet; later ones wait (unbounded
    # here: the gateway's outbox bounds them) until ACKs make room.
    max_pending_pushes: int = 256
    auth_failure_limit: int = 10
    auth_failure_window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"tcp port must be 0..65535, got {self.port}")
        if not self.agent_class:
            raise ValueError("tcp agent_class must not be empty")
        if self.max_frame_bytes < 256:
            raise ValueError(f"tcp max_frame_bytes must be >= 256, got {self.max_frame_bytes}")
        for name in ("max_unacked_window", "max_connections", "max_pending_pushes"):
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


class SecretsFileError(ValueError):
    """The device secrets file is missing, unreadable or malformed."""


def load_secrets_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read device secrets from a TOML file of top-level `"device-id" = "secret"` pairs.

        # /etc/gatewayd/devices.toml  (chmod 600, owned by the gatewayd user)
        "thermo-42" = "6f1c0d...e9"
        "pump-7"    = "a93b44...01"

    Device ids follow FRAMES.md (1..128 UTF-8 bytes, no control characters); secrets are
    1..256 UTF-8 bytes. A file that other users may read is accepted with a warning.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            document = tomllib.load(file)
    except OSError as exc:
        raise SecretsFileError(f"tcp secrets file {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SecretsFileError(f"tcp secrets file {path}: not valid TOML ({exc})") from None
    if mode & stat.S_IRWXO:
        logger.warning(
            "tcp: secrets file %s is accessible by all users (mode %o); chmod 600 or 640 it",
            path,
            stat.S_IMODE(mode),
        )
    result: dict[str, str] = {}
    for device_id, secret in document.items():
        if not isinstance(secret, str):
            raise SecretsFileError(
                f"tcp secrets file {path}: value of {device_id!r} must be a string secret, "
                f"got {type(secret).__name__}"
            )
        try:
            Hello(device_id, secret)  # the same rules a HELLO frame must pass
        except FrameError as exc:
            raise SecretsFileError(f"tcp secrets file {path}: entry {device_id!r}: {exc}") from None
        result[device_id] = secret
    return result


class _AuthFailureLimiter:
    """Counts failed HELLOs per remote IP in a sliding window (bounded number of IPs)."""

    _MAX_TRACKED_IPS = 10_000

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, ip: str, now: float) -> deque[float] | None:
        times = self._failures.get(ip)
        if times is not None:
            while times and now - times[0] >= self._window_s:
                times.popleft()
            if not times:
                del self._failures[ip]
                return None
        return times

    def is_limited(self, ip: str, now: float) -> bool:
        times = self._recent(ip, now)
        return times is not None and len(times) >= self._limit

    def record_failure(self, ip: str, now: float) -> bool:
        """Record one failure; True when this failure reached the limit."""
        times = self._recent(ip, now)
        if times is None:
            times = self._failures[ip] = deque()
            if len(self._failures) > self._MAX_TRACKED_IPS:
                self._failures.popitem(last=False)
        self._failures.move_to_end(ip)
        times.append(now)
        return len(times) == self._limit


class _State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPENING = "opening"  # authenticated, waiting for handler.open_link's future
    OPEN = "open"
    CLOSING = "closing"  # reading stopped, settling in-flight DATA
    CLOSED = "closed"


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
    """One TCP connection: decoder, authentication, the DATA window, timers."""

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.settings = listener.settings
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(self.settings.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self.remote = "?"
        self._remote_ip = "?"
        self.state = _State.AWAIT_HELLO
        self.device_id: str | None = None
        self.link: TcpLink | None = None
        self._link_released = False
        self._counted_open = False  # links_open counts links that got HELLO_OK
        self._client = ""
        self._in_flight: dict[int, asyncio.Future[Outcome]] = {}
        self._last_data_seq = 0
        self._last_received_at = self._loop.time()
        self._ping_seq = 0
        self._ping_sent_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._settle_timer: asyncio.TimerHandle | None = None
        self._close_frame: Close | None = None
        self._close_code = CONNECTION_LOST_CODE
        self._close_reason = "connection lost"
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # ACKs settled in this loop iteration (the turns of one commit settle together): sent
        # with one write at its end instead of one send() each.
        self._pending_acks: list[bytes] | None = None

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
            self.fail(ErrorCode.SERVER_BUSY, "gateway at its connection limit; retry later")
            return
        self._timer = self._loop.call_later(self.settings.hello_timeout_s, self._hello_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.state not in (_State.AWAIT_HELLO, _State.OPENING, _State.OPEN):
            return
        self._decoder.receive_data(data)
        self._drain_decoder()

    def eof_received(self) -> bool:
        if self.state in (_State.CLOSING, _State.CLOSED):
            return True
        self._decoder.end_of_stream()
        self._drain_decoder()
        if self.state is _State.OPEN:
            # Half-closed: the device may still read ACKs for what it sent.
            self._close_reason = "device closed the connection without CLOSE"
            self.close_after_settling(ErrorCode.NORMAL, "", peer_initiated=True)
        elif self.state in (_State.AWAIT_HELLO, _State.OPENING):
            self._close_reason = "device closed before HELLO_OK"
            self._shutdown_transport()
        return True  # keep the write side open until we close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _State.CLOSED
        for timer in (self._timer, self._settle_timer):
            if timer is not None:
                timer.cancel()
        TCP_CONNECTIONS.dec()
        self.listener.unregister(self)
        self._release_link(self._close_code, self._close_reason)
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------------------------------ frames

    def _drain_decoder(self) -> None:
        while self.state in (_State.AWAIT_HELLO, _State.OPENING, _State.OPEN):
            try:
                frame = self._decoder.next_frame()
            except FrameError as exc:
                self._protocol_error(exc.code, str(exc))
                return
            if frame is None:
                return
            # Liveness counts whole frames, so a trickle of bytes cannot keep a link alive.
            self._last_received_at = self._loop.time()
            _FRAMES_RECEIVED_BY_TYPE[frame.TYPE].inc()
            self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        if isinstance(frame, Close):
            self._close_code, self._close_reason = frame.code, frame.reason
            self.close_after_settling(ErrorCode.NORMAL, "", peer_initiated=True)
        elif isinstance(frame, Error):
            logger.warning(
                "tcp: device %r (%s) reported error %d on seq %d: %s; closing",
                self.device_id,
                self.remote,
                frame.code,
                frame.seq,
                frame.message,
            )
            self._close_code, self._close_reason = frame.code, frame.message
            self.close_after_settling(ErrorCode.NORMAL, "", peer_initiated=True)
        elif self.state is _State.AWAIT_HELLO:
            if isinstance(frame, Hello):
                self._authenticate(frame)
            else:
                self._protocol_error(
                    ErrorCode.HELLO_REQUIRED, f"{frame.TYPE.name} frame before HELLO"
                )
        elif self.state is _State.OPENING:
            self._protocol_error(
                ErrorCode.HELLO_REQUIRED, f"{frame.TYPE.name} frame before HELLO_OK was sent"
            )
        elif isinstance(frame, Data):
            self._submit(frame)
        elif isinstance(frame, Ack):
            assert self.device_id is not None
            if self.listener.push_acked(self.device_id, frame.seq):
                TCP_PUSHES.labels("acked").inc()
        elif isinstance(frame, Ping):
            self._write(Pong(frame.seq))
        elif isinstance(frame, Pong):
            pass  # receiving anything already counts as liveness
        else:
            self._protocol_error(
                ErrorCode.UNEXPECTED, f"{frame.TYPE.name} frame is not valid from a device"
            )

    def _authenticate(self, hello: Hello) -> None:
        now = self._loop.time()
        limiter = self.listener.auth_limiter
        if limiter.is_limited(self._remote_ip, now):
            TCP_AUTH_FAILURES.inc()
            self.listener.stats_extra_inc("auth_rate_limited")
            self.fail(ErrorCode.RATE_LIMITED, "too many failed HELLOs from this address")
            return
        expected = self.settings.secrets.get(hello.device_id)
        # Compare against a dummy for unknown ids too, so timing does not reveal valid ids.
        candidate = expected if expected is not None else "\x00unknown-device"
        secret_ok = hmac.compare_digest(candidate.encode(), hello.secret.encode())
        if expected is None or not secret_ok:
            TCP_AUTH_FAILURES.inc()
            self.listener.stats.rejected += 1
            self.listener.stats_extra_inc("auth_failures")
            why = "unknown device id" if expected is None else "wrong secret"
            if limiter.record_failure(self._remote_ip, now):
                logger.warning(
                    "tcp: %d failed HELLOs from %s within %.0fs (last: device %r, %s); refusing "
                    "HELLOs from that address until the window passes",
                    self.settings.auth_failure_limit,
                    self._remote_ip,
                    self.settings.auth_failure_window_s,
                    hello.device_id,
                    why,
                )
            elif not limiter.is_limited(self._remote_ip, now):
                logger.warning(
                    "tcp: authentication failed for device %r from %s (%s)",
                    hello.device_id,
                    self.remote,
                    why,
                )
            self.fail(ErrorCode.AUTH_FAILED, "authentication failed")
            return
        # The hello timer keeps running until HELLO_OK: it also bounds a stuck open_link.
        self.device_id = hello.device_id
        self._client = hello.client
        self.state = _State.OPENING
        self.listener.claim_device(self)
        self.link = TcpLink(self, self.listener.next_link_id(), hello.device_id)
        context: dict[str, Any] = {
            "transport": "tcp",
            "device_id": hello.device_id,
            "remote": self.remote,
            "client": hello.client,
            "tls": self._transport is not None
            and self._transport.get_extra_info("sslcontext") is not None,
            "peercert": self._transport.get_extra_info("peercert") if self._transport else None,
        }
        try:
            opened = self.listener.handler.open_link(self.link, context)
        except Exception as exc:  # the handler must not take the listener down with it
            logger.exception("tcp: handler.open_link failed for device %r", hello.device_id)
            self._forget_link()
            self.fail(ErrorCode.NOT_APPLIED, f"could not open the device's agent ({exc})")
            return
        opened.add_done_callback(self._opened)

    def _opened(self, opened: asyncio.Future[Outcome]) -> None:
        if self.state is not _State.OPENING:
            return  # closed or replaced meanwhile; close_link was or will be called
        exc = None if opened.cancelled() else opened.exception()
        if opened.cancelled() or exc is not None:
            self._forget_link()
            if isinstance(exc, LinkRejected):
                logger.info(
                    "tcp: agent refused device %r from %s: %s", self.device_id, self.remote, exc
                )
                self.fail(ErrorCode.REJECTED, exc.reason)
            else:
                logger.error(
                    "tcp: opening device %r from %s failed (%r); closing, device will retry",
                    self.device_id,
                    self.remote,
                    exc or "cancelled",
                )
                self.fail(ErrorCode.NOT_APPLIED, "could not open the device's agent; retry later")
            return
        settings = self.settings
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state = _State.OPEN
        self.listener.stats.links_open += 1
        self._counted_open = True
        logger.info(
            "tcp: device %r connected from %s%s",
            self.device_id,
            self.remote,
            f" ({self._client})" if self._client else "",
        )
        self._write(
            HelloOk(
                max_frame_bytes=settings.max_frame_bytes,
                max_unacked=settings.max_unacked_window,
                ping_interval_ms=round(settings.ping_interval_s * 1000),
                push_epoch=self.listener.push_epoch,
            )
        )
        assert self.device_id is not None
        for seq, payload, resend in self.listener.pending_pushes(self.device_id):
            self.write_push(seq, payload, resend)
        self._schedule_ping_check(settings.ping_interval_s)

    def _submit(self, frame: Data) -> None:
        if frame.seq <= self._last_data_seq:
            self._protocol_error(
                ErrorCode.BAD_SEQ,
                f"DATA seq {frame.seq} is not above the previous seq {self._last_data_seq} "
                "on this connection",
            )
            return
        if len(self._in_flight) >= self.settings.max_unacked_window:
            self._protocol_error(
                ErrorCode.WINDOW_EXCEEDED,
                f"DATA seq {frame.seq} exceeds the window of "
                f"{self.settings.max_unacked_window} unacknowledged frames",
            )
            return
        assert self.link is not None and self.device_id is not None
        self._last_data_seq = frame.seq
        self.listener.stats.messages_in += 1
        if frame.resend:
            self.listener.stats_extra_inc("data_resent")
        try:
            settled = self.listener.handler.submit_message(
                self.link, frame.payload, DedupKey(self.device_id, frame.seq)
            )
        except Exception as exc:
            logger.exception("tcp: handler.submit_message failed for device %r", self.device_id)
            settled = self._loop.create_future()
            settled.set_exception(exc)
        self._in_flight[frame.seq] = settled
        settled.add_done_callback(functools.partial(self._settled, frame.seq))

    def _settled(self, seq: int, settled: asyncio.Future[Outcome]) -> None:
        self._in_flight.pop(seq, None)
        exc: BaseException | None = (
            asyncio.CancelledError() if settled.cancelled() else settled.exception()
        )
        if exc is None:
            outcome = settled.result()
            _DATA_OUTCOME_BY_VALUE[outcome].inc()
            if outcome is Outcome.DUPLICATE:
                self.listener.stats_extra_inc("data_duplicates")
            self._queue_ack(seq)
        else:
            if isinstance(exc, LinkRejected):
                code, message = ErrorCode.REJECTED, exc.reason
                TCP_DATA_OUTCOMES.labels("rejected").inc()
            else:
                code, message = ErrorCode.NOT_APPLIED, "not applied; retransmit after reconnecting"
                TCP_DATA_OUTCOMES.labels("not_applied").inc()
            logger.warning(
                "tcp: DATA seq %d from device %r not applied (%r); closing so the device "
                "resends from its oldest unacknowledged frame",
                seq,
                self.device_id,
                exc,
            )
            self.listener.stats_extra_inc("data_not_applied")
            self._write(Error(code, message[:1024], seq))
            if self.state in (_State.OPEN, _State.CLOSING):
                self.close_after_settling(code, message)
        if self.state is _State.CLOSING and not self._in_flight:
            self._finish_close()

    # ------------------------------------------------------------ timers

    def _hello_timed_out(self) -> None:
        self._timer = None
        if self.state is _State.AWAIT_HELLO:
            self._protocol_error(
                ErrorCode.HELLO_TIMEOUT,
                f"no HELLO within {self.settings.hello_timeout_s:g}s of connecting",
            )
        elif self.state is _State.OPENING:
            logger.error(
                "tcp: the agent for device %r did not accept its link within %gs; closing, "
                "the device will retry",
                self.device_id,
                self.settings.hello_timeout_s,
            )
            self.fail(ErrorCode.NOT_APPLIED, "the device's agent did not answer; retry later")

    def _schedule_ping_check(self, delay_s: float) -> None:
        self._timer = self._loop.call_later(delay_s, self._ping_check)

    def _ping_check(self) -> None:
        self._timer = None
        if self.state is not _State.OPEN:
            return
        now = self._loop.time()
        settings = self.settings
        if self._ping_sent_at is not None:
            if self._last_received_at < self._ping_sent_at:
                waited_s = now - self._ping_sent_at
                if waited_s >= settings.ping_timeout_s:
                    self._protocol_error(
                        ErrorCode.PING_TIMEOUT,
                        f"nothing received for {settings.ping_timeout_s:g}s after a PING",
                    )
                else:
                    self._schedule_ping_check(settings.ping_timeout_s - waited_s)
                return
            self._ping_sent_at = None
        idle_s = now - self._last_received_at
        if idle_s >= settings.ping_interval_s:
            self._ping_seq += 1
            self._ping_sent_at = now
            self._write(Ping(self._ping_seq))
            self._schedule_ping_check(settings.ping_timeout_s)
        else:
            self._schedule_ping_check(settings.ping_interval_s - idle_s)

    # ------------------------------------------------------------ output and closing

    def _queue_ack(self, seq: int) -> None:
        pending = self._pending_acks
        if pending is None:
            self._pending_acks = [encode(Ack(seq))]
            self._loop.call_soon(self._flush_acks)
        else:
            pending.append(encode(Ack(seq)))

    def _flush_acks(self) -> None:
        pending = self._pending_acks
        if pending is None:
            return
        self._pending_acks = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        self._check_send_buffer(transport)

    def _write(self, frame: Frame) -> None:
        self._flush_acks()  # frames leave in the order they were written
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(encode(frame))
        self._check_send_buffer(transport)

    def _check_send_buffer(self, transport: asyncio.Transport) -> None:
        if transport.get_write_buffer_size() > self.settings.send_buffer_limit_bytes:
            TCP_PROTOCOL_ERRORS.labels(ErrorCode.SLOW_CONSUMER.name).inc()
            self.listener.stats_extra_inc("slow_consumers")
            logger.warning(
                "tcp: device %r (%s) is not reading; send buffer over %d bytes, disconnecting",
                self.device_id,
                self.remote,
                self.settings.send_buffer_limit_bytes,
            )
            self._close_code, self._close_reason = ErrorCode.SLOW_CONSUMER, "not reading"
            self.state = _State.CLOSING
            transport.abort()

    def write_push(self, seq: int, payload: bytes, resend: bool) -> None:
        if self.state is not _State.OPEN:
            return
        TCP_PUSHES.labels("resent" if resend else "sent").inc()
        self.listener.stats.messages_out += 1
        self._write(Push(seq, payload, resend))

    def _protocol_error(self, code: ErrorCode, message: str) -> None:
        TCP_PROTOCOL_ERRORS.labels(code.name).inc()
        self.listener.stats.rejected += 1
        self.listener.stats_extra_inc("protocol_errors")
        device = f"device {self.device_id!r}" if self.device_id else "unauthenticated"
        logger.warning(
            "tcp: protocol error from %s (%s): %s [%s]; closing",
            self.remote,
            device,
            message,
            code.name,
        )
        self.fail(code, message)

    def fail(self, code: ErrorCode, message: str) -> None:
        """Fatal: send ERROR(code), nothing after it, and close now."""
        if self.state is _State.CLOSED:
            return
        self._close_code, self._close_reason = code, message
        self._write(Error(code, message[:1024]))
        self.state = _State.CLOSING
        self._shutdown_transport()

    def close_after_settling(
        self,
        code: int,
        reason: str,
        timeout_s: float | None = None,
        *,
        peer_initiated: bool = False,
    ) -> None:
        """Stop reading, wait for in-flight DATA to be ACKed/ERRORed, send CLOSE, close.

        `code`/`reason` go into our CLOSE frame; when the gateway initiates, they are also
        what `close_link` reports (a peer-initiated close reports the peer's code instead).
        """
        if self.state is _State.CLOSED:
            return
        if self._close_frame is None:
            self._close_frame = Close(code, reason[:1024])
            if not peer_initiated and self._close_code == CONNECTION_LOST_CODE:
                self._close_code, self._close_reason = code, reason
        if self.state is not _State.CLOSING:
            self.state = _State.CLOSING
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._transport is not None and not self._transport.is_closing():
                self._transport.pause_reading()
        if not self._in_flight:
            self._finish_close()
        elif self._settle_timer is None:
            wait_s = self.settings.settle_timeout_s if timeout_s is None else timeout_s
            self._settle_timer = self._loop.call_later(wait_s, self._settle_timed_out)

    def _settle_timed_out(self) -> None:
        self._settle_timer = None
        logger.warning(
            "tcp: device %r (%s): %d DATA frames still unsettled at close; the device resends them",
            self.device_id,
            self.remote,
            len(self._in_flight),
        )
        self._in_flight.clear()
        self._finish_close()

    def _finish_close(self) -> None:
        if self._close_frame is not None:
            self._write(self._close_frame)
        self._shutdown_transport()

    def _shutdown_transport(self) -> None:
        self._flush_acks()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

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
        if self.state is not _State.CLOSED:
            self._write(Close(ErrorCode.REPLACED, reason))
            self.state = _State.CLOSING
            self._shutdown_transport()

    def _forget_link(self) -> None:
        """open_link failed: the handler never had this link, so no close_link for it."""
        self._link_released = True
        self.listener.release_device(self)

    def _release_link(self, code: int, reason: str) -> None:
        if self.link is None or self._link_released:
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
        self.auth_limiter = _AuthFailureLimiter(
            settings.auth_failure_limit, settings.auth_failure_window_s
        )
        # Push seqs are durable (FRAMES.md 6): the epoch never changes.
        self.push_epoch = DURABLE_PUSH_EPOCH
        self._server: asyncio.Server | None = None
        self._connections: set[_DeviceConnection] = set()
        self._live_by_device: dict[str, _DeviceConnection] = {}
        self._pushes = PushOutbox(settings.max_pending_pushes)
        self._link_ids = itertools.count(1)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _DeviceConnection(self),
            self.settings.host,
            self.settings.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.settings.hello_timeout_s if self.ssl_context else None,
            reuse_address=True,
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
                if not connection.closed.done() and connection._transport is not None:
                    connection._transport.abort()
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

    def push_backlog(self, device_id: str) -> int:
        """Pushes the device has not ACKed yet (written or waiting for the window)."""
        return self._pushes.backlog(device_id)

    def _write_pushes(self, device_id: str) -> None:
        """Fill the push window of the device's open connection, if it has one."""
        live = self._live_by_device.get(device_id)
        if live is not None and live.state is _State.OPEN:
            for seq, payload, resend in self._pushes.take_window(device_id):
                live.write_push(seq, payload, resend)
