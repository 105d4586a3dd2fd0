"""Sans-I/O state machine of one binary-frame TCP session, gateway side (FRAMES.md 4.1, 5-7).

The connection half of what `protocols.frames` is the codec half of, modelled on
`h11.Connection`: bytes and the time go in, events come out, bytes to write are collected for
the caller; no socket, clock, event loop or logging inside, so every rule is testable with
plain calls. `protocols.tcp` is the asyncio plumbing around it.

    session = TcpSession(settings, now=loop.time())
    session.receive_data(chunk, now=loop.time())
    while (event := session.next_event()) is not None:
        if isinstance(event, HelloReceived):      # the caller decides, before the next event:
            session.authenticated()               #   ... then opens the agent's link
        elif isinstance(event, DataReceived):     # submit; later data_applied / data_not_applied
            ...
    transport.write(session.data_to_send())
    if session.state is SessionState.CLOSED:
        transport.close()

The rules it owns: HELLO first and nothing else until HELLO_OK (DATA pipelined behind HELLO is
refused), the order of checks, DATA seqs strictly increasing on a connection and not below the
HELLO's `resume_seq`, the unacked window, ACK or ERROR for every DATA in flight (also while
closing), PING/PONG liveness, the hello and settle timeouts, and the close handshake.
It does not own authentication (`protocols.tcp_auth`), pushes' storage (the listener's push
store) or the agent (the `LinkHandler`).

This module must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protocols.frames import (
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
    encode_ack,
)
from protocols.tcp_settings import TcpSettings

CONNECTION_LOST_CODE = 1006  # close code when the TCP connection ended without a CLOSE
_MAX_TEXT_BYTES = 1024  # ERROR message / CLOSE reason (FRAMES.md section 3)


class SessionState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AUTHENTICATING = "authenticating"  # HelloReceived returned; the caller decides now
    OPENING = "opening"  # authenticated; waiting for the agent to accept (accept / fail)
    OPEN = "open"
    CLOSING = "closing"  # reads nothing more; settling in-flight DATA, then CLOSE
    CLOSED = "closed"  # write what data_to_send returns, then close the transport


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """A well-formed HELLO arrived. Call `authenticated()` or `fail(...)` before the next
    `next_event()`; until then the session returns no further event."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A DATA frame passed the seq and window rules; it is in flight until the caller calls
    `data_applied(seq)` or `data_not_applied(seq, ...)`."""

    frame: Data


@dataclass(frozen=True, slots=True)
class PushAcked:
    """The device acknowledged a PUSH (possibly one that is not outstanding: ignore those)."""

    seq: int


@dataclass(frozen=True, slots=True)
class PeerClosing:
    """The device sent CLOSE (or ERROR, `error=True`, about `seq`): the session reads nothing
    more, settles what is in flight, then answers CLOSE(1000)."""

    code: int
    reason: str
    error: bool = False
    seq: int = 0


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The session failed the connection itself (bad input, a rule broken by the device, a
    timeout): ERROR(code, message) is queued and the state is CLOSED."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class SettleTimedOut:
    """Closing gave up waiting for `unsettled` in-flight DATA frames (the device resends them)."""

    unsettled: int


Event = HelloReceived | DataReceived | PushAcked | PeerClosing | SessionFailed | SettleTimedOut

_READING = frozenset(
    {
        SessionState.AWAIT_HELLO,
        SessionState.AUTHENTICATING,
        SessionState.OPENING,
        SessionState.OPEN,
    }
)
_BEFORE_OPEN = frozenset(
    {SessionState.AWAIT_HELLO, SessionState.AUTHENTICATING, SessionState.OPENING}
)
_GATEWAY_ONLY = frozenset({FrameType.HELLO_OK, FrameType.PUSH})
# What goes past DATA held by `hold_data` (everything else waits behind it, in order).
_PASS_HELD_DATA = frozenset({FrameType.ACK, FrameType.PING, FrameType.PONG})


def clip_text(text: str, max_bytes: int = _MAX_TEXT_BYTES) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, on a character boundary."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore")


class TcpSession:
    """The gateway's side of one connection. Not thread-safe; one per connection."""

    def __init__(
        self,
        settings: TcpSettings,
        now: float,
        *,
        on_frame: Callable[[FrameType], None] | None = None,
    ) -> None:
        self.settings = settings
        self.state = SessionState.AWAIT_HELLO
        self.device_id: str | None = None
        self.client = ""
        self.resume_seq = 0  # from the HELLO; 0 when the device did not announce one
        # What the gateway reports as the session's end (close_link): the device's CLOSE code,
        # the ErrorCode the session failed with, our own close code, or 1006.
        self.close_code: int = CONNECTION_LOST_CODE
        self.close_reason = "connection lost"
        self._on_frame = on_frame
        self._decoder = FrameDecoder(settings.max_frame_bytes)
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()  # produced outside next_event (timeouts)
        self._eof_at: float | None = None
        self._in_flight: set[int] = set()
        self._last_data_seq = 0
        self._connected_at = now
        self._last_frame_at = now  # liveness counts whole frames, not bytes
        self._input_paused = False
        # DATA held back (`hold_data`), with any CLOSE/ERROR/other frame behind it, in order.
        self._data_held = False
        self._held: deque[Frame] = deque()
        self._ping_seq = 0
        self._ping_sent_at: float | None = None
        self._close_frame: Close | None = None
        self._settle_deadline: float | None = None

    # ------------------------------------------------------------ queries

    @property
    def accepts_input(self) -> bool:
        """Whether bytes from the device are still read (False once closing)."""
        return self.state in _READING

    @property
    def input_paused(self) -> bool:
        """Whether `pause_input` holds the device's input."""
        return self._input_paused

    @property
    def data_held(self) -> bool:
        """Whether `hold_data` holds the device's DATA frames."""
        return self._data_held

    @property
    def held_frames(self) -> int:
        """Frames received and kept back by `hold_data` (DATA, and what came after it)."""
        return len(self._held)

    @property
    def queued_frames(self) -> int:
        """Frames queued for the device and not yet taken by `data_to_send`."""
        return len(self._out)

    @property
    def in_flight(self) -> int:
        """DATA frames handed out as DataReceived and not yet settled."""
        return len(self._in_flight)

    def data_to_send(self) -> bytes:
        """Everything queued for the device since the last call, in order."""
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def next_deadline(self) -> float | None:
        """When `handle_timeout` has something to do (None: nothing is timed)."""
        state = self.state
        if state in _BEFORE_OPEN:
            return self._connected_at + self.settings.hello_timeout_s
        if state is SessionState.OPEN:
            if self._input_paused:
                return None
            if self._ping_sent_at is not None and self._last_frame_at < self._ping_sent_at:
                return self._ping_sent_at + self.settings.ping_timeout_s
            return self._last_frame_at + self.settings.ping_interval_s
        if state is SessionState.CLOSING:
            return self._settle_deadline
        return None

    # ------------------------------------------------------------ input from the device

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes read from the connection at time `now` (ignored once not reading)."""
        if not self.accepts_input:
            return
        before = self._decoder.frames_decoded
        self._decoder.receive_data(data)
        if self._decoder.frames_decoded != before:
            self._last_frame_at = now

    def receive_eof(self, now: float) -> None:
        """The device half-closed the connection at `now` (it sends nothing more)."""
        if self.accepts_input:
            self._decoder.end_of_stream()
            self._eof_at = now

    def next_event(self) -> Event | None:
        """The next event, or None when nothing more can happen without new input."""
        if self._events:
            return self._events.popleft()
        while (
            self.state in _READING
            and self.state is not SessionState.AUTHENTICATING
            and not self._input_paused
        ):
            if self._held and not self._data_held:
                event = self._handle(self._held.popleft())  # released: in arrival order
                if event is not None:
                    return event
                continue
            try:
                frame = self._decoder.next_frame()
            except FrameError as exc:
                return self._failed(exc.code, str(exc))
            if frame is None:
                if self._eof_at is None:
                    return None
                self._end_of_stream(self._eof_at)
                continue
            if self._on_frame is not None:
                self._on_frame(frame.TYPE)
            if (
                (self._data_held or self._held)
                and self.state is SessionState.OPEN
                and frame.TYPE not in _PASS_HELD_DATA
            ):
                failed = self._keep(frame)
                if failed is not None:
                    return failed
                continue
            event = self._handle(frame)
            if event is not None:
                return event
        return None

    def handle_timeout(self, now: float) -> None:
        """Run what is due at `now` (hello timeout, PING, ping timeout, settle timeout).
        A failure it causes comes out of `next_event` as SessionFailed / SettleTimedOut."""
        state = self.state
        settings = self.settings
        if state in _BEFORE_OPEN:
            if now < self._connected_at + settings.hello_timeout_s:
                return
            if state is SessionState.OPENING:
                self._events.append(
                    self._failed(
                        ErrorCode.NOT_APPLIED, "the device's agent did not answer; retry later"
                    )
                )
            else:
                self._events.append(
                    self._failed(
                        ErrorCode.HELLO_TIMEOUT,
                        f"no HELLO within {settings.hello_timeout_s:g}s of connecting",
                    )
                )
        elif state is SessionState.OPEN and not self._input_paused:
            if self._ping_sent_at is not None:
                if self._last_frame_at < self._ping_sent_at:
                    if now - self._ping_sent_at >= settings.ping_timeout_s:
                        self._events.append(
                            self._failed(
                                ErrorCode.PING_TIMEOUT,
                                f"nothing received for {settings.ping_timeout_s:g}s after a PING",
                            )
                        )
                    return
                self._ping_sent_at = None
            if now - self._last_frame_at >= settings.ping_interval_s:
                self._ping_seq += 1
                self._ping_sent_at = now
                self._queue(Ping(self._ping_seq))
        elif (
            state is SessionState.CLOSING
            and self._settle_deadline is not None
            and now >= self._settle_deadline
        ):
            self._events.append(SettleTimedOut(len(self._in_flight)))
            self._in_flight.clear()
            self._finish_close()

    def connection_lost(self) -> None:
        """The transport is gone: nothing more is sent; in-flight DATA is forgotten."""
        self.state = SessionState.CLOSED
        self._in_flight.clear()
        self._out.clear()

    # ------------------------------------------------------------ the gateway's decisions

    def authenticated(self) -> None:
        """The HELLO's credentials are good: wait for the agent (`accept` / `fail`)."""
        self._expect(SessionState.AUTHENTICATING, "authenticated")
        self.state = SessionState.OPENING

    def accept(self, push_epoch: int, now: float) -> None:
        """The agent accepted the link: send HELLO_OK; DATA may flow."""
        self._expect(SessionState.OPENING, "accept")
        settings = self.settings
        self.state = SessionState.OPEN
        self._last_frame_at = max(self._last_frame_at, now)  # the idle clock starts now
        self._queue(
            HelloOk(
                max_frame_bytes=settings.max_frame_bytes,
                max_unacked=settings.max_unacked_window,
                ping_interval_ms=round(settings.ping_interval_s * 1000),
                push_epoch=push_epoch,
            )
        )

    def fail(self, code: ErrorCode, message: str) -> None:
        """Fatal: queue ERROR(code, message), nothing after it; the state becomes CLOSED."""
        if self.state is SessionState.CLOSED:
            return
        message = clip_text(message)
        self.close_code, self.close_reason = code, message
        self._queue(Error(code, message))
        self.state = SessionState.CLOSED
        self._in_flight.clear()

    def abort(self, code: int, reason: str) -> None:
        """The gateway drops the connection without a word (e.g. a slow reader)."""
        if self.state is not SessionState.CLOSED:
            self.close_code, self.close_reason = code, reason
        self.connection_lost()

    def replace(self, reason: str) -> None:
        """A newer connection authenticated as this device: CLOSE(REPLACED) now, unsettled."""
        if self.state is SessionState.CLOSED:
            return
        reason = clip_text(reason)
        self.close_code, self.close_reason = ErrorCode.REPLACED, reason
        self._queue(Close(ErrorCode.REPLACED, reason))
        self.state = SessionState.CLOSED
        self._in_flight.clear()

    def close(
        self,
        code: int,
        reason: str,
        now: float,
        settle_timeout_s: float | None = None,
        *,
        peer_initiated: bool = False,
    ) -> None:
        """Stop reading, settle in-flight DATA (ACK or ERROR each), then CLOSE(code, reason).

        `code`/`reason` are also what the session reports as its end unless the device
        closed first (`peer_initiated`, or a code recorded earlier)."""
        if self.state is SessionState.CLOSED:
            return
        if self._close_frame is None:
            self._close_frame = Close(code, clip_text(reason))
            if not peer_initiated and self.close_code == CONNECTION_LOST_CODE:
                self.close_code, self.close_reason = code, reason
        if self.state is not SessionState.CLOSING:
            self.state = SessionState.CLOSING
            wait_s = (
                self.settings.settle_timeout_s if settle_timeout_s is None else settle_timeout_s
            )
            self._settle_deadline = now + wait_s
        if not self._in_flight:
            self._finish_close()

    def data_applied(self, seq: int) -> None:
        """The DATA frame `seq` is durably applied (or was already): queue its ACK."""
        if seq not in self._in_flight:
            return  # forgotten (settle timeout, connection gone)
        self._in_flight.discard(seq)
        self._out.append(encode_ack(seq))
        if self.state is SessionState.CLOSING and not self._in_flight:
            self._finish_close()

    def data_not_applied(self, seq: int, code: ErrorCode, message: str, now: float) -> None:
        """The DATA frame `seq` was not applied: ERROR(code, seq), then close after settling
        the rest (FRAMES.md 5.4), so the device resends in order on its next connection."""
        if seq not in self._in_flight:
            return
        self._in_flight.discard(seq)
        message = clip_text(message)
        self._queue(Error(code, message, seq))
        self.close(code, message, now)

    def send_push(self, seq: int, payload: bytes, resend: bool) -> bool:
        """Queue PUSH(seq); False (nothing queued) unless the session is open."""
        if self.state is not SessionState.OPEN:
            return False
        self._queue(Push(seq, payload, resend))
        return True

    def hold_data(self) -> None:
        """Stop handing out DATA (the device's pushes or the socket's send side are backed
        up): DATA frames, and any CLOSE/ERROR behind them, are kept in arrival order until
        `release_data`, while ACK, PING and PONG frames still go through (the device can still
        acknowledge pushes and prove it is alive). The window bounds what is kept."""
        self._data_held = True

    def release_data(self) -> None:
        """Hand out the kept frames again (from `next_event`), then new ones."""
        self._data_held = False

    def pause_input(self) -> None:
        """The gateway holds the device's input (backpressure): `next_event` hands out no
        further frame, and since the device's silence is then not its fault, liveness checks
        wait too, until `resume_input`. Timeouts and gateway calls still work."""
        self._input_paused = True

    def resume_input(self, now: float) -> None:
        self._input_paused = False
        self._last_frame_at = max(self._last_frame_at, now)
        self._ping_sent_at = None

    # ------------------------------------------------------------ internals

    def _keep(self, frame: Frame) -> SessionFailed | None:
        # Kept frames count against the window like frames in flight: the device may not have
        # more than `max_unacked` DATA frames unACKed, kept or not (plus one CLOSE/ERROR).
        window = self.settings.max_unacked_window
        if len(self._in_flight) + len(self._held) >= window + 1:
            return self._failed(
                ErrorCode.WINDOW_EXCEEDED,
                f"{frame.TYPE.name} frame beyond the window of {window} unacknowledged frames "
                "while the gateway holds this device's DATA",
            )
        self._held.append(frame)
        return None

    def _expect(self, state: SessionState, call: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"TcpSession.{call}() in state {self.state.value}")

    def _queue(self, frame: Frame) -> None:
        self._out.append(encode(frame))

    def _failed(self, code: ErrorCode, message: str) -> SessionFailed:
        self.fail(code, message)
        return SessionFailed(code, clip_text(message))

    def _finish_close(self) -> None:
        if self._close_frame is not None:
            self._queue(self._close_frame)
        self.state = SessionState.CLOSED

    def _end_of_stream(self, now: float) -> None:
        self._eof_at = None
        if self.state is SessionState.OPEN:
            # Half-closed: the device may still read the ACKs for what it sent.
            self.close_reason = "device closed the connection without CLOSE"
            self.close(ErrorCode.NORMAL, "", now, peer_initiated=True)
        else:
            self.close_reason = "device closed before HELLO_OK"
            self.state = SessionState.CLOSED

    def _handle(self, frame: Frame) -> Event | None:
        # The order of checks is FRAMES.md 4.1: the frame itself (decoder), then direction,
        # then CLOSE/ERROR in any state, then the state, then the type's own rules.
        if type(frame) is Data and self.state is SessionState.OPEN:
            return self._data(frame)  # the common case, same checks in fewer steps
        if frame.TYPE in _GATEWAY_ONLY:
            return self._failed(
                ErrorCode.UNEXPECTED, f"{frame.TYPE.name} frame is not valid from a device"
            )
        if isinstance(frame, Close):
            self.close_code, self.close_reason = frame.code, frame.reason
            self.close(ErrorCode.NORMAL, "", self._last_frame_at, peer_initiated=True)
            return PeerClosing(frame.code, frame.reason)
        if isinstance(frame, Error):
            self.close_code, self.close_reason = frame.code, frame.message
            self.close(ErrorCode.NORMAL, "", self._last_frame_at, peer_initiated=True)
            return PeerClosing(frame.code, frame.message, error=True, seq=frame.seq)
        state = self.state
        if state is SessionState.AWAIT_HELLO:
            if isinstance(frame, Hello):
                self.device_id = frame.device_id
                self.client = frame.client
                self.resume_seq = frame.resume_seq
                self._last_data_seq = max(frame.resume_seq - 1, 0)
                self.state = SessionState.AUTHENTICATING
                return HelloReceived(frame)
            return self._failed(ErrorCode.HELLO_REQUIRED, f"{frame.TYPE.name} frame before HELLO")
        if state is SessionState.OPENING:
            # Includes DATA pipelined right behind the HELLO: nothing but CLOSE/ERROR may be
            # sent before HELLO_OK (the link may still be refused).
            return self._failed(
                ErrorCode.HELLO_REQUIRED, f"{frame.TYPE.name} frame before HELLO_OK was sent"
            )
        if isinstance(frame, Data):
            return self._data(frame)
        if isinstance(frame, Ack):
            return PushAcked(frame.seq)
        if isinstance(frame, Ping):
            self._queue(Pong(frame.seq))
            return None
        if isinstance(frame, Pong):
            return None  # receiving anything already counts as liveness
        return self._failed(ErrorCode.UNEXPECTED, f"a second {frame.TYPE.name} frame")

    def _data(self, frame: Data) -> Event:
        if frame.seq <= self._last_data_seq:
            if self.resume_seq and frame.seq < self.resume_seq:
                why = f"is below the resume_seq {self.resume_seq} announced in HELLO"
            else:
                why = f"is not above the previous seq {self._last_data_seq} on this connection"
            return self._failed(ErrorCode.BAD_SEQ, f"DATA seq {frame.seq} {why}")
        window = self.settings.max_unacked_window
        if len(self._in_flight) >= window:
            return self._failed(
                ErrorCode.WINDOW_EXCEEDED,
                f"DATA seq {frame.seq} exceeds the window of {window} unacknowledged frames",
            )
        self._last_data_seq = frame.seq
        self._in_flight.add(frame.seq)
        return DataReceived(frame)
