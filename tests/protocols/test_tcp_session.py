"""Tests for protocols/tcp_session.py: every session rule with plain calls, no socket, no clock."""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.frames import (
    Ack,
    Close,
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    HelloOk,
    Ping,
    Pong,
    Push,
    encode,
)
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
    clip_text,
)
from protocols.tcp_settings import TcpSettings

SETTINGS = TcpSettings(
    agent_class="thermostat",
    max_unacked_window=3,
    hello_timeout_s=10.0,
    ping_interval_s=30.0,
    ping_timeout_s=5.0,
    settle_timeout_s=4.0,
)
EPOCH = 77
HELLO = Hello("dev-a", "secret-a", "fw/1")


def new_session(now: float = 0.0, **overrides: Any) -> TcpSession:
    return TcpSession(dataclasses.replace(SETTINGS, **overrides), now)


def raw(frame_type: int, body: bytes = b"", *, seq: int = 0, length: int | None = None) -> bytes:
    """A frame built by hand, bypassing the encoder's validation."""
    size = 11 + len(body) if length is None else length
    return size.to_bytes(4, "big") + bytes((0xA1, frame_type, 0)) + seq.to_bytes(8, "big") + body


def feed(session: TcpSession, *frames: Frame | bytes, now: float = 0.0) -> list[Event]:
    data = b"".join(f if isinstance(f, bytes) else encode(f) for f in frames)
    session.receive_data(data, now)
    return drain(session)


def drain(session: TcpSession) -> list[Event]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def sent(session: TcpSession) -> list[Frame]:
    return FrameDecoder(1 << 20).feed(session.data_to_send())


def open_session(now: float = 0.0, hello: Hello = HELLO, **overrides: Any) -> TcpSession:
    session = new_session(now, **overrides)
    assert feed(session, hello, now=now) == [HelloReceived(hello)]
    session.authenticated()
    session.accept(EPOCH, now)
    assert sent(session) == [HelloOk(65536, session.settings.max_unacked_window, 30000, EPOCH)]
    return session


def failed(code: ErrorCode, events: list[Event]) -> SessionFailed:
    assert len(events) == 1 and isinstance(events[0], SessionFailed), events
    assert events[0].code is code
    return events[0]


# ---------------------------------------------------------------- HELLO sequencing


def test_hello_then_authenticated_then_accept_sends_hello_ok_and_opens() -> None:
    session = new_session()
    assert session.state is SessionState.AWAIT_HELLO
    hello = Hello("dev-a", "secret-a", "fw/1", resume_seq=40)
    assert feed(session, hello) == [HelloReceived(hello)]
    assert session.state is SessionState.AUTHENTICATING
    assert (session.device_id, session.client, session.resume_seq) == ("dev-a", "fw/1", 40)
    session.authenticated()
    assert session.state is SessionState.OPENING
    assert sent(session) == []  # nothing before the agent accepted
    session.accept(EPOCH, now=1.0)
    assert session.state is SessionState.OPEN
    assert sent(session) == [HelloOk(65536, 3, 30000, EPOCH)]


def test_no_event_after_hello_until_the_gateway_decides() -> None:
    session = new_session()
    events = feed(session, HELLO, Data(1, b"x"), Ping(1))
    assert events == [HelloReceived(HELLO)]
    assert session.next_event() is None  # still undecided: the DATA is not looked at
    assert sent(session) == []


def test_data_pipelined_behind_hello_is_refused_with_hello_required() -> None:
    session = new_session()
    assert feed(session, HELLO, Data(1, b"too early")) == [HelloReceived(HELLO)]
    session.authenticated()
    event = failed(ErrorCode.HELLO_REQUIRED, drain(session))
    assert event.message == "DATA frame before HELLO_OK was sent"
    assert session.state is SessionState.CLOSED
    assert sent(session) == [Error(ErrorCode.HELLO_REQUIRED, event.message)]
    # The agent's late answer must not reopen it.
    with pytest.raises(RuntimeError, match="in state closed"):
        session.accept(EPOCH, 1.0)


def test_data_behind_hello_is_refused_even_when_it_arrives_in_a_later_read() -> None:
    session = new_session()
    feed(session, HELLO)
    session.authenticated()
    failed(ErrorCode.HELLO_REQUIRED, feed(session, Data(1, b"x"), now=0.5))


def test_a_refused_hello_ends_the_session_before_pipelined_data_is_read() -> None:
    session = new_session()
    assert feed(session, HELLO, Data(1, b"x")) == [HelloReceived(HELLO)]
    session.fail(ErrorCode.AUTH_FAILED, "authentication failed")
    assert drain(session) == []
    assert sent(session) == [Error(ErrorCode.AUTH_FAILED, "authentication failed")]
    assert (session.close_code, session.close_reason) == (
        ErrorCode.AUTH_FAILED,
        "authentication failed",
    )


@pytest.mark.parametrize("frame", [Data(1, b"x"), Ping(3), Pong(3), Ack(1)])
def test_any_frame_but_hello_close_error_before_hello_is_hello_required(frame: Frame) -> None:
    session = new_session()
    event = failed(ErrorCode.HELLO_REQUIRED, feed(session, frame))
    assert event.message == f"{frame.TYPE.name} frame before HELLO"
    assert sent(session) == [Error(ErrorCode.HELLO_REQUIRED, event.message)]


@pytest.mark.parametrize("opened", [False, True])
@pytest.mark.parametrize("frame", [HelloOk(65536, 1, 0, 0), Push(1, b"x")])
def test_gateway_only_frames_from_a_device_are_unexpected_in_any_state(
    frame: Frame, opened: bool
) -> None:
    session = open_session() if opened else new_session()
    event = failed(ErrorCode.UNEXPECTED, feed(session, frame))
    assert event.message == f"{frame.TYPE.name} frame is not valid from a device"


def test_second_hello_is_unexpected() -> None:
    session = open_session()
    assert failed(ErrorCode.UNEXPECTED, feed(session, HELLO)).message == "a second HELLO frame"


# ---------------------------------------------------------------- order of checks (FRAMES.md 4.1)


def test_hello_ok_with_a_bad_body_from_a_device_is_bad_body_not_unexpected() -> None:
    # The frame is checked (header, then body) before its direction.
    bad_body = cbor2.dumps({"max_frame_bytes": "big"})
    failed(ErrorCode.BAD_BODY, feed(new_session(), raw(FrameType.HELLO_OK, bad_body)))


def test_hello_with_a_bad_seq_and_a_bad_body_is_bad_seq() -> None:
    # The header (seq) is checked before the body.
    event = failed(ErrorCode.BAD_SEQ, feed(new_session(), raw(FrameType.HELLO, b"\xff", seq=5)))
    assert "HELLO seq must be 0, got 5" in event.message


def test_oversized_hello_is_refused_from_its_length_before_any_credential_check() -> None:
    hello = encode(Hello("dev-a", "s" * 250))
    assert len(hello) > 256
    session = new_session(max_frame_bytes=256)
    event = failed(ErrorCode.FRAME_TOO_LARGE, feed(session, hello[:4]))
    assert "over the 256-byte limit" in event.message
    assert session.device_id is None  # never got as far as a HelloReceived


def test_malformed_hello_body_is_bad_body_and_not_an_authentication_attempt() -> None:
    body = cbor2.dumps({"device_id": "a\nb", "secret": "s"})
    failed(ErrorCode.BAD_BODY, feed(new_session(), raw(FrameType.HELLO, body)))


def test_hello_with_resume_seq_zero_is_bad_body() -> None:
    body = cbor2.dumps({"device_id": "d", "secret": "s", "resume_seq": 0})
    event = failed(ErrorCode.BAD_BODY, feed(new_session(), raw(FrameType.HELLO, body)))
    assert "resume_seq must be an integer in 1.." in event.message


def test_valid_frames_before_a_bad_one_are_handled_first() -> None:
    session = open_session()
    events = feed(session, Data(1, b"a"), Ping(9), b"\x00\x00\x00\x0b\x7b" + bytes(10))
    assert events[0] == DataReceived(Data(1, b"a"))
    failed(ErrorCode.BAD_MAGIC, events[1:])
    assert sent(session) == [Pong(9), Error(ErrorCode.BAD_MAGIC, events[1].message)]


# ---------------------------------------------------------------- DATA: seq, window, settling


def test_data_is_handed_out_in_order_and_acked_as_it_settles() -> None:
    session = open_session()
    events = feed(session, Data(1, b"a"), Data(2, b"b"), Data(3, b"c", resend=True))
    assert [e.frame for e in events if isinstance(e, DataReceived)] == [
        Data(1, b"a"),
        Data(2, b"b"),
        Data(3, b"c", resend=True),
    ]
    assert len(events) == 3
    assert session.in_flight == 3
    session.data_applied(2)
    session.data_applied(1)
    session.data_applied(1)  # a second settlement of the same seq is ignored
    assert sent(session) == [Ack(2), Ack(1)]
    assert session.in_flight == 1


@pytest.mark.parametrize("second", [5, 4])
def test_data_seq_must_increase_on_a_connection(second: int) -> None:
    session = open_session()
    feed(session, Data(5, b"a"))
    event = failed(ErrorCode.BAD_SEQ, feed(session, Data(second, b"b")))
    assert event.message == f"DATA seq {second} is not above the previous seq 5 on this connection"


def test_window_counts_unsettled_frames() -> None:
    session = open_session()
    assert len(feed(session, Data(1, b"a"), Data(2, b"b"), Data(3, b"c"))) == 3
    session.data_applied(1)
    assert feed(session, Data(4, b"d")) == [DataReceived(Data(4, b"d"))]
    event = failed(ErrorCode.WINDOW_EXCEEDED, feed(session, Data(5, b"e")))
    assert event.message == "DATA seq 5 exceeds the window of 3 unacknowledged frames"


def test_resume_seq_sets_the_lowest_seq_the_device_may_send() -> None:
    session = open_session(hello=Hello("dev-a", "secret-a", resume_seq=100))
    event = failed(ErrorCode.BAD_SEQ, feed(session, Data(99, b"old")))
    assert event.message == "DATA seq 99 is below the resume_seq 100 announced in HELLO"

    session = open_session(hello=Hello("dev-a", "secret-a", resume_seq=100))
    assert feed(session, Data(100, b"first")) == [DataReceived(Data(100, b"first"))]


def test_not_applied_data_gets_error_then_the_rest_settles_then_close() -> None:
    session = open_session()
    feed(session, Data(1, b"a"), Data(2, b"b"), Data(3, b"c"))
    session.data_applied(1)
    session.data_not_applied(2, ErrorCode.NOT_APPLIED, "not applied; retransmit", now=1.0)
    assert session.state is SessionState.CLOSING
    assert not session.accepts_input
    # Nothing more is read once closing, not even a valid frame.
    assert feed(session, Data(4, b"d")) == []
    session.data_not_applied(3, ErrorCode.NOT_APPLIED, "not applied; retransmit", now=1.0)
    assert session.state is SessionState.CLOSED
    assert sent(session) == [
        Ack(1),
        Error(ErrorCode.NOT_APPLIED, "not applied; retransmit", 2),
        Error(ErrorCode.NOT_APPLIED, "not applied; retransmit", 3),
        Close(ErrorCode.NOT_APPLIED, "not applied; retransmit"),
    ]
    assert session.close_code == ErrorCode.NOT_APPLIED


def test_rejected_data_closes_with_rejected() -> None:
    session = open_session()
    feed(session, Data(1, b"a"))
    session.data_not_applied(1, ErrorCode.REJECTED, "out of range", now=0.0)
    assert sent(session) == [
        Error(ErrorCode.REJECTED, "out of range", 1),
        Close(ErrorCode.REJECTED, "out of range"),
    ]


# ---------------------------------------------------------------- close


def test_device_close_settles_in_flight_data_then_answers_close() -> None:
    session = open_session()
    events = feed(session, Data(1, b"last"), Close(1000, "powering down"), Data(2, b"ignored"))
    assert events == [DataReceived(Data(1, b"last")), PeerClosing(1000, "powering down")]
    assert session.state is SessionState.CLOSING
    assert sent(session) == []
    session.data_applied(1)
    assert session.state is SessionState.CLOSED
    assert sent(session) == [Ack(1), Close(1000, "")]
    assert (session.close_code, session.close_reason) == (1000, "powering down")


def test_device_error_is_reported_and_closes_like_close() -> None:
    session = open_session()
    events = feed(session, Error(6, "could not parse push 4", 4))
    assert events == [PeerClosing(6, "could not parse push 4", error=True, seq=4)]
    assert sent(session) == [Close(1000, "")]
    assert session.close_code == 6


def test_close_before_hello_is_answered() -> None:
    session = new_session()
    assert feed(session, Close(1000, "changed my mind")) == [PeerClosing(1000, "changed my mind")]
    assert sent(session) == [Close(1000, "")]
    assert session.state is SessionState.CLOSED


def test_gateway_close_waits_for_in_flight_data_and_reports_its_own_code() -> None:
    session = open_session()
    feed(session, Data(1, b"a"))
    session.close(ErrorCode.GOING_AWAY, "gateway shutting down", now=2.0)
    assert sent(session) == []
    session.data_applied(1)
    assert sent(session) == [Ack(1), Close(ErrorCode.GOING_AWAY, "gateway shutting down")]
    assert session.close_code == ErrorCode.GOING_AWAY


def test_settle_timeout_forgets_in_flight_data_and_closes() -> None:
    session = open_session()
    feed(session, Data(1, b"a"), Data(2, b"b"))
    session.close(4001, "agent closed", now=10.0)
    assert session.next_deadline() == 14.0
    session.handle_timeout(13.9)
    assert drain(session) == []
    session.handle_timeout(14.0)
    assert drain(session) == [SettleTimedOut(2)]
    assert sent(session) == [Close(4001, "agent closed")]
    session.data_applied(1)  # too late: nothing more is sent
    assert sent(session) == []


def test_shutdown_settle_timeout_overrides_the_setting() -> None:
    session = open_session()
    feed(session, Data(1, b"a"))
    session.close(ErrorCode.GOING_AWAY, "bye", now=10.0, settle_timeout_s=0.5)
    assert session.next_deadline() == 10.5


def test_close_while_awaiting_hello_sends_close() -> None:
    session = new_session()
    session.close(ErrorCode.GOING_AWAY, "gateway shutting down", now=1.0)
    assert sent(session) == [Close(ErrorCode.GOING_AWAY, "gateway shutting down")]
    assert session.state is SessionState.CLOSED


def test_replace_closes_at_once_even_with_data_in_flight() -> None:
    session = open_session()
    feed(session, Data(1, b"a"))
    session.replace("replaced by a newer connection from 10.0.0.2:5000")
    assert session.state is SessionState.CLOSED
    assert sent(session) == [
        Close(ErrorCode.REPLACED, "replaced by a newer connection from 10.0.0.2:5000")
    ]
    session.data_applied(1)
    assert sent(session) == []


def test_half_close_when_open_settles_then_closes() -> None:
    session = open_session()
    feed(session, Data(1, b"a"))
    session.receive_eof(now=1.0)
    assert drain(session) == []
    assert session.state is SessionState.CLOSING
    session.data_applied(1)
    assert sent(session) == [Ack(1), Close(1000, "")]
    assert (session.close_code, session.close_reason) == (
        CONNECTION_LOST_CODE,
        "device closed the connection without CLOSE",
    )


def test_half_close_inside_a_frame_is_truncated() -> None:
    session = open_session()
    session.receive_data(encode(Data(1, b"abcdef"))[:10], 1.0)
    session.receive_eof(1.0)
    failed(ErrorCode.TRUNCATED, drain(session))


def test_half_close_before_hello_ok_closes_silently() -> None:
    session = new_session()
    feed(session, HELLO)
    session.authenticated()
    session.receive_eof(1.0)
    assert drain(session) == []
    assert session.state is SessionState.CLOSED
    assert sent(session) == []
    assert session.close_reason == "device closed before HELLO_OK"


def test_fail_is_final() -> None:
    session = open_session()
    session.fail(ErrorCode.SLOW_CONSUMER, "first")
    session.fail(ErrorCode.NOT_APPLIED, "second")
    session.close(1000, "third", now=0.0)
    assert sent(session) == [Error(ErrorCode.SLOW_CONSUMER, "first")]
    assert feed(session, Ping(1)) == []
    assert not session.send_push(1, b"x", resend=False)
    assert sent(session) == []


def test_abort_records_why_and_sends_nothing() -> None:
    session = open_session()
    session.send_push(1, b"x", resend=False)
    session.abort(ErrorCode.SLOW_CONSUMER, "not reading")
    assert session.state is SessionState.CLOSED
    assert session.data_to_send() == b""
    assert (session.close_code, session.close_reason) == (ErrorCode.SLOW_CONSUMER, "not reading")


def test_long_texts_are_clipped_to_1024_utf8_bytes() -> None:
    assert clip_text("é" * 600).encode() == ("é" * 512).encode()
    session = open_session()
    session.close(4000, "ü" * 2000, now=0.0)
    (close,) = sent(session)
    assert isinstance(close, Close) and len(close.reason.encode()) == 1024


# ---------------------------------------------------------------- pushes


def test_pushes_go_out_only_when_open_and_device_acks_become_events() -> None:
    session = new_session()
    assert not session.send_push(1, b"early", resend=False)
    session = open_session()
    assert session.send_push(1, b"on", resend=False)
    assert session.send_push(2, b"again", resend=True)
    assert sent(session) == [Push(1, b"on"), Push(2, b"again", resend=True)]
    assert feed(session, Ack(2), Ack(1)) == [PushAcked(2), PushAcked(1)]


# ---------------------------------------------------------------- timeouts and liveness


def test_hello_timeout() -> None:
    session = new_session(now=100.0)
    assert session.next_deadline() == 110.0
    session.handle_timeout(109.99)
    assert drain(session) == []
    session.handle_timeout(110.0)
    event = failed(ErrorCode.HELLO_TIMEOUT, drain(session))
    assert event.message == "no HELLO within 10s of connecting"
    assert sent(session) == [Error(ErrorCode.HELLO_TIMEOUT, event.message)]


def test_an_agent_that_does_not_open_in_time_gets_not_applied() -> None:
    session = new_session()
    feed(session, HELLO, now=1.0)
    session.authenticated()
    assert session.next_deadline() == 10.0  # the same clock as the HELLO's
    session.handle_timeout(10.0)
    event = failed(ErrorCode.NOT_APPLIED, drain(session))
    assert event.message == "the device's agent did not answer; retry later"


def test_ping_answered_with_pong() -> None:
    session = open_session()
    assert feed(session, Ping(77)) == []
    assert sent(session) == [Pong(77)]


def test_idle_device_is_pinged_and_kept_when_it_answers() -> None:
    session = open_session(now=0.0)
    assert session.next_deadline() == 30.0
    session.handle_timeout(30.0)
    assert sent(session) == [Ping(1)]
    assert session.next_deadline() == 35.0  # the ping timeout
    feed(session, Pong(1), now=31.0)
    session.handle_timeout(35.0)  # the old deadline fires: nothing to do now
    assert drain(session) == [] and sent(session) == []
    assert session.next_deadline() == 61.0
    session.handle_timeout(61.0)
    assert sent(session) == [Ping(2)]


def test_silent_device_gets_ping_timeout() -> None:
    session = open_session(now=0.0)
    session.handle_timeout(30.0)
    sent(session)
    session.handle_timeout(34.9)
    assert drain(session) == []
    session.handle_timeout(35.0)
    event = failed(ErrorCode.PING_TIMEOUT, drain(session))
    assert event.message == "nothing received for 5s after a PING"


def test_a_trickle_of_bytes_is_not_liveness() -> None:
    session = open_session(now=0.0)
    partial = encode(Data(1, b"x" * 50))
    for i, at in enumerate((10.0, 20.0, 29.0)):
        session.receive_data(partial[i : i + 1], at)
    assert drain(session) == []
    assert session.next_deadline() == 30.0  # still counted from the HELLO_OK


def test_paused_input_hands_out_no_frames_and_suspends_liveness() -> None:
    session = open_session(now=0.0)
    events = feed(session, Data(1, b"a"))
    assert events == [DataReceived(Data(1, b"a"))]
    session.pause_input()
    assert feed(session, Data(2, b"b"), Ping(5), now=1.0) == []
    assert session.next_deadline() is None
    session.handle_timeout(1000.0)
    assert sent(session) == []  # no PING, no PING_TIMEOUT while the gateway holds input
    session.resume_input(now=1000.0)
    assert drain(session) == [DataReceived(Data(2, b"b"))]
    assert sent(session) == [Pong(5)]
    assert session.next_deadline() == 1030.0


def test_timeouts_and_gateway_calls_still_work_while_paused() -> None:
    session = open_session(now=0.0)
    feed(session, Data(1, b"a"))
    session.pause_input()
    session.close(ErrorCode.GOING_AWAY, "bye", now=5.0)
    session.handle_timeout(9.0)
    assert drain(session) == [SettleTimedOut(1)]
    assert sent(session) == [Close(ErrorCode.GOING_AWAY, "bye")]


def test_held_data_keeps_data_and_close_in_order_but_lets_acks_and_pings_through() -> None:
    session = open_session(now=0.0)
    assert feed(session, Data(1, b"a")) == [DataReceived(Data(1, b"a"))]
    session.hold_data()
    events = feed(session, Data(2, b"b"), Ack(7), Ping(3), Close(1000, "bye"), Pong(1), now=1.0)
    assert events == [PushAcked(7)]  # the push ACK goes past the held DATA
    assert sent(session) == [Pong(3)]
    assert session.held_frames == 2 and session.in_flight == 1
    assert session.state is SessionState.OPEN  # the CLOSE waits behind DATA 2
    session.release_data()
    assert drain(session) == [DataReceived(Data(2, b"b")), PeerClosing(1000, "bye")]
    assert session.state is SessionState.CLOSING
    session.data_applied(1)
    session.data_applied(2)
    assert sent(session) == [Ack(1), Ack(2), Close(ErrorCode.NORMAL, "")]


def test_held_data_counts_against_the_window() -> None:
    session = open_session(now=0.0)  # window 3
    feed(session, Data(1, b"a"))
    session.hold_data()
    assert feed(session, Data(2, b"b"), Data(3, b"c"), Close(1000, "")) == []
    event = failed(ErrorCode.WINDOW_EXCEEDED, feed(session, Data(4, b"d")))
    assert "while the gateway holds this device's DATA" in event.message


def test_frames_are_counted_for_metrics() -> None:
    seen: list[FrameType] = []
    session = TcpSession(SETTINGS, 0.0, on_frame=seen.append)
    feed(session, HELLO)
    session.authenticated()
    session.accept(EPOCH, 0.0)
    feed(session, Ping(1), Data(1, b"a"))
    assert seen == [FrameType.HELLO, FrameType.PING, FrameType.DATA]


def test_calls_in_the_wrong_state_are_programming_errors() -> None:
    session = new_session()
    with pytest.raises(RuntimeError, match=r"authenticated\(\) in state await_hello"):
        session.authenticated()
    with pytest.raises(RuntimeError, match=r"accept\(\) in state await_hello"):
        session.accept(EPOCH, 0.0)


# ---------------------------------------------------------------- any input


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(
        st.one_of(
            st.builds(Data, seq=st.integers(1, 6), payload=st.binary(max_size=8)),
            st.builds(Ack, seq=st.integers(1, 4)),
            st.builds(Ping, seq=st.integers(0, 3)),
            st.just(Pong(1)),
            st.just(HELLO),
            st.just(Close(1000, "")),
            st.just(Push(1, b"p")),
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(1, 40), max_size=8),
    settle_ok=st.booleans(),
)
def test_any_frame_sequence_keeps_the_invariants(
    frames: list[Frame], cuts: list[int], settle_ok: bool
) -> None:
    session = open_session()
    wire = b"".join(encode(f) for f in frames)
    chunks, pos = [], 0
    for cut in [*cuts, len(wire)]:
        chunks.append(wire[pos : pos + cut])
        pos += cut
    received: list[int] = []
    for now, chunk in enumerate(chunks):
        session.receive_data(chunk, float(now))
        for event in drain(session):
            if isinstance(event, DataReceived):
                assert event.frame.seq > (received[-1] if received else 0)
                received.append(event.frame.seq)
                assert session.in_flight <= SETTINGS.max_unacked_window
        for seq in received:
            if settle_ok:
                session.data_applied(seq)
            else:
                session.data_not_applied(seq, ErrorCode.NOT_APPLIED, "x", float(now))
    out = sent(session)
    # At most one fatal ERROR without a seq, and nothing after it or after a CLOSE.
    enders = [
        i for i, f in enumerate(out) if isinstance(f, Close) or (isinstance(f, Error) and not f.seq)
    ]
    assert len(enders) <= 1
    if enders:
        assert enders[0] == len(out) - 1
        assert session.state is SessionState.CLOSED
    acked = [f.seq for f in out if isinstance(f, Ack)]
    assert sorted(acked) == acked and set(acked) <= set(received)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), opened=st.booleans())
def test_arbitrary_bytes_never_raise_and_end_with_one_error_at_most(
    data: bytes, opened: bool
) -> None:
    session = open_session() if opened else new_session()
    session.receive_data(data, 1.0)
    events = drain(session)
    for event in events:
        if isinstance(event, HelloReceived):
            session.fail(ErrorCode.AUTH_FAILED, "authentication failed")
    drain(session)
    errors = [f for f in sent(session) if isinstance(f, Error)]
    assert len(errors) <= 1
    if errors:
        assert session.state is SessionState.CLOSED
