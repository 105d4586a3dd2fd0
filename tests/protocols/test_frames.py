"""Tests for protocols/frames.py: round trips, the FRAMES.md examples, and hostile input."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.frames import (
    FLAG_RESEND,
    MAX_SEQ,
    MIN_FRAME_BYTES,
    Ack,
    Close,
    Data,
    Error,
    ErrorCode,
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

FRAMES_MD = Path(__file__).resolve().parents[2] / "protocols" / "FRAMES.md"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_frame(
    frame_type: int,
    body: bytes = b"",
    *,
    seq: int = 0,
    flags: int = 0,
    magic: int = 0xA1,
    length: int | None = None,
) -> bytes:
    """A frame built by hand, bypassing the encoder's validation."""
    if length is None:
        length = 11 + len(body)
    return struct.pack(">IBBBQ", length, magic, frame_type, flags, seq) + body


def decode_one(data: bytes, max_frame_bytes: int = 65536):
    frames = FrameDecoder(max_frame_bytes).feed(data)
    assert len(frames) == 1
    return frames[0]


def decode_error(data: bytes, max_frame_bytes: int = 65536) -> FrameError:
    decoder = FrameDecoder(max_frame_bytes)
    with pytest.raises(FrameError) as info:
        decoder.feed(data)
    return info.value


# ---------------------------------------------------------------- strategies

seqs = st.integers(min_value=1, max_value=MAX_SEQ)
uints = st.integers(min_value=0, max_value=2**64 - 1)
device_ids = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, blacklist_characters="\x7f", blacklist_categories=("Cs",)
    ),
    min_size=1,
    max_size=32,
)
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
payloads = st.binary(max_size=600)

frames_strategy = st.one_of(
    st.builds(
        Hello,
        device_id=device_ids,
        secret=texts.filter(bool),
        client=texts,
        resume_seq=st.integers(0, MAX_SEQ),
    ),
    st.builds(
        HelloOk,
        max_frame_bytes=st.integers(min_value=MIN_FRAME_BYTES, max_value=2**32),
        max_unacked=st.integers(min_value=1, max_value=2**16),
        ping_interval_ms=uints,
        push_epoch=uints,
    ),
    st.builds(Data, seq=seqs, payload=payloads, resend=st.booleans()),
    st.builds(Ack, seq=seqs),
    st.builds(Push, seq=seqs, payload=payloads, resend=st.booleans()),
    st.builds(Ping, seq=st.integers(0, MAX_SEQ)),
    st.builds(Pong, seq=st.integers(0, MAX_SEQ)),
    st.builds(Error, code=uints, message=texts, seq=st.integers(0, MAX_SEQ)),
    st.builds(Close, code=uints, reason=texts),
)


# ---------------------------------------------------------------- round trips


@FAST
@given(frame=frames_strategy)
def test_every_frame_type_round_trips(frame) -> None:
    wire = encode(frame)
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4
    assert wire[4] == 0xA1 and wire[5] == frame.TYPE
    assert decode_one(wire) == frame


@FAST
@given(frames=st.lists(frames_strategy, min_size=1, max_size=6), data=st.data())
def test_any_split_of_a_stream_decodes_the_same(frames, data) -> None:
    wire = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = FrameDecoder()
    got = []
    start = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.feed(wire[start:cut])
        start = cut
    assert got == frames
    assert decoder.buffered_bytes == 0


def test_split_at_every_offset_and_byte_by_byte() -> None:
    frames = [
        Hello("dev-1", "pw", "fw/2"),
        Data(1, b"x" * 40),
        Ack(3),
        Push(2, b"", resend=True),
        Ping(9),
        Error(20, "window", 4),
        Close(1000, "bye"),
    ]
    wire = b"".join(encode(f) for f in frames)
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == frames
    decoder = FrameDecoder()
    got = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i : i + 1])
        assert decoder.buffered_bytes < decoder.max_frame_bytes
    assert got == frames


def test_payload_of_maximum_size_fits_and_one_more_byte_does_not() -> None:
    limit = 1024
    # 15 header bytes + 3-byte CBOR byte-string header (0x59 + 2 length bytes) + payload
    fits = Data(1, b"p" * (limit - 18))
    assert len(encode(fits)) == limit
    assert decode_one(encode(fits), limit) == fits
    error = decode_error(encode(Data(1, b"p" * (limit - 17))), limit)
    assert error.code is ErrorCode.FRAME_TOO_LARGE


def test_indefinite_length_and_non_minimal_byte_strings_are_accepted() -> None:
    indefinite = b"\x5f\x42ab\x41c\xff"
    assert decode_one(raw_frame(FrameType.DATA, indefinite, seq=3)) == Data(3, b"abc")
    non_minimal = b"\x59\x00\x02hi"
    assert decode_one(raw_frame(FrameType.PUSH, non_minimal, seq=1)) == Push(1, b"hi")


@FAST
@given(
    seq=st.integers(1, MAX_SEQ),
    payload=st.binary(max_size=300),
    resend=st.booleans(),
    body_form=st.sampled_from(["minimal", "uint8", "uint16", "uint32", "uint64", "indefinite"]),
)
def test_data_decodes_the_same_in_any_byte_string_form(
    seq: int, payload: bytes, resend: bool, body_form: str
) -> None:
    """The decoder's DATA fast path (definite-length bodies) and its general path (the rest)
    agree, alone and behind another frame."""
    n = len(payload)
    header = {
        "minimal": encode(Data(1, payload))[15 : -n or None],
        "uint8": b"\x58" + n.to_bytes(1, "big") if n < 256 else b"\x59" + n.to_bytes(2, "big"),
        "uint16": b"\x59" + n.to_bytes(2, "big"),
        "uint32": b"\x5a" + n.to_bytes(4, "big"),
        "uint64": b"\x5b" + n.to_bytes(8, "big"),
        "indefinite": b"\x5f" + encode(Data(1, payload))[15 : -n or None],
    }[body_form]
    body = header + payload + (b"\xff" if body_form == "indefinite" else b"")
    frame = raw_frame(FrameType.DATA, body, seq=seq, flags=FLAG_RESEND if resend else 0)
    assert decode_one(frame) == Data(seq, payload, resend)
    assert FrameDecoder().feed(encode(Ping(1)) + frame + frame[:-1]) == [
        Ping(1),
        Data(seq, payload, resend),
    ]


def test_encode_ack_is_encode_of_an_ack() -> None:
    for seq in (1, 2, 255, 2**32, MAX_SEQ):
        assert encode_ack(seq) == encode(Ack(seq))


def test_unknown_map_keys_are_ignored() -> None:
    body = cbor2.dumps({"device_id": "d", "secret": "s", "future_key": [1, 2, {"x": 3}]})
    assert decode_one(raw_frame(FrameType.HELLO, body)) == Hello("d", "s")


def test_hello_repr_hides_the_secret() -> None:
    assert "hunter2" not in repr(Hello("dev", "hunter2"))


# ---------------------------------------------------------------- FRAMES.md examples

DOCUMENTED = {
    "HELLO": Hello("thermo-42", "s3cret", "fw/1.0"),
    "HELLO (resuming)": Hello("thermo-42", "s3cret", resume_seq=1001),
    "HELLO_OK": HelloOk(65536, 64, 30000, 1),  # push_epoch: constant since seqs are durable
    "DATA": Data(1, b"hello"),
    "DATA (resend)": Data(7, b"\x01\x02", resend=True),
    "ACK": Ack(1),
    "PUSH": Push(1, b"on"),
    "PING": Ping(42),
    "PONG": Pong(42),
    "ERROR": Error(32, "commit failed", 9),
    "CLOSE": Close(1000, "bye"),
}


def documented_examples() -> dict[str, tuple[str, bytes]]:
    text = FRAMES_MD.read_text(encoding="utf-8")
    section = text.split("<!-- examples:begin -->", 1)[1].split("<!-- examples:end -->", 1)[0]
    examples = {}
    for match in re.finditer(r"^### (.+?)\n\n(.+?):\n\n```\n(.*?)```", section, re.S | re.M):
        title, prose, block = match.groups()
        hex_text = "".join(line.split(";", 1)[0] for line in block.splitlines())
        examples[title] = (prose, bytes.fromhex(hex_text))
    return examples


def test_every_frame_type_has_a_documented_example() -> None:
    examples = documented_examples()
    assert set(examples) == set(DOCUMENTED)
    assert {type(f) for f in DOCUMENTED.values()} == {
        Hello,
        HelloOk,
        Data,
        Ack,
        Push,
        Ping,
        Pong,
        Error,
        Close,
    }


@pytest.mark.parametrize("title", sorted(DOCUMENTED))
def test_documented_example_decodes_as_documented(title: str) -> None:
    prose, wire = documented_examples()[title]
    expected = DOCUMENTED[title]
    assert decode_one(wire) == expected
    assert encode(expected) == wire
    # The prose states the values; make sure it states these ones.
    for value in re.findall(r"`([^`]+)`", prose):
        rendered = repr(expected) + getattr(expected, "secret", "")
        if isinstance(expected, Data | Push):
            rendered += expected.payload.hex(" ") + expected.payload.decode("latin-1")
        assert value in rendered, f"{title}: documented value {value!r} not in {rendered}"
    for number in re.findall(r"\b(\d+)\b", prose.replace("(5.6)", "")):
        assert number in repr(expected) or number in ("2", "5"), (title, number)


# ---------------------------------------------------------------- hostile input


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), limit=st.sampled_from([MIN_FRAME_BYTES, 64, 300, 65536]))
def test_arbitrary_bytes_raise_only_frame_error_and_buffer_below_the_limit(data, limit) -> None:
    decoder = FrameDecoder(limit)
    for start in range(0, len(data), 37):
        try:
            decoder.feed(data[start : start + 37])
        except FrameError as error:
            assert isinstance(error.code, ErrorCode)
            assert error.offset is not None and 0 <= error.offset <= len(data)
        assert decoder.buffered_bytes < limit


@settings(max_examples=300, deadline=None)
@given(frame=frames_strategy, data=st.data())
def test_corrupted_valid_frames_raise_only_frame_error(frame, data) -> None:
    wire = bytearray(encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(4, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    try:
        FrameDecoder().feed(bytes(wire))
    except FrameError as error:
        assert isinstance(error.code, ErrorCode)


def test_oversized_length_is_rejected_from_the_prefix_alone() -> None:
    decoder = FrameDecoder(1024)
    with pytest.raises(FrameError) as info:
        decoder.feed((1_000_000).to_bytes(4, "big"))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert "1000004-byte frame, over the 1024-byte limit" in str(info.value)
    assert decoder.buffered_bytes == 0
    # Dead decoder: further data is dropped, not buffered, and the error repeats.
    with pytest.raises(FrameError):
        decoder.feed(b"\x00" * 5000)
    assert decoder.buffered_bytes == 0 and decoder.failed


def test_unknown_type_names_the_type_and_where() -> None:
    good = encode(Ack(1))
    error = decode_error(good + raw_frame(0x17))
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert str(error) == f"frame #2 at stream offset {len(good)}: frame type 0x17 unknown"
    assert error.offset == len(good) + 5
    # Reported as soon as the type byte arrives, before the rest of the frame.
    with pytest.raises(FrameError):
        FrameDecoder().feed(raw_frame(0x17)[:6])


def test_frames_before_an_error_are_kept() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(encode(Ping(1)) + encode(Pong(1)) + b"\x00\x00\x00\x0b\xa2")
    assert info.value.frames_before == (Ping(1), Pong(1))
    assert info.value.code is ErrorCode.BAD_MAGIC


@pytest.mark.parametrize(
    ("wire", "code", "fragment"),
    [
        (raw_frame(FrameType.PING, magic=0x7B), ErrorCode.BAD_MAGIC, "0x7b, expected 0xa1"),
        (raw_frame(FrameType.PING, length=3), ErrorCode.BAD_LENGTH, "length 3"),
        (raw_frame(FrameType.ACK, seq=1, flags=0x01), ErrorCode.BAD_FLAGS, "not allowed on ACK"),
        (raw_frame(FrameType.DATA, b"\x40", seq=1, flags=0x80), ErrorCode.BAD_FLAGS, "0x80"),
        (raw_frame(FrameType.DATA, b"\xff", seq=1), ErrorCode.INVALID_CBOR, "not valid CBOR"),
        (raw_frame(FrameType.DATA, b"\x5a\xff\xff\xff\xff", seq=1), ErrorCode.INVALID_CBOR, "CBOR"),
        (raw_frame(FrameType.DATA, b"\x41a\x00", seq=1), ErrorCode.INVALID_CBOR, "1 trailing"),
        (raw_frame(FrameType.DATA, b"\x61a", seq=1), ErrorCode.BAD_BODY, "got str"),
        (raw_frame(FrameType.DATA, b"", seq=1), ErrorCode.INVALID_CBOR, "CBOR"),
        (raw_frame(FrameType.DATA, b"\x40", seq=0), ErrorCode.BAD_SEQ, "DATA seq must be 1"),
        (raw_frame(FrameType.ACK, seq=0), ErrorCode.BAD_SEQ, "ACK seq"),
        (raw_frame(FrameType.ACK, b"\xf6", seq=1), ErrorCode.BAD_BODY, "must be empty"),
        (raw_frame(FrameType.HELLO, b""), ErrorCode.BAD_BODY, "got an empty body"),
        (raw_frame(FrameType.HELLO, cbor2.dumps([1])), ErrorCode.BAD_BODY, "got list"),
        (
            raw_frame(FrameType.HELLO, cbor2.dumps({"device_id": "d"})),
            ErrorCode.BAD_BODY,
            "missing 'secret'",
        ),
        (
            raw_frame(FrameType.HELLO, cbor2.dumps({"device_id": 5, "secret": "s"})),
            ErrorCode.BAD_BODY,
            "device_id must be a text string",
        ),
        (
            raw_frame(FrameType.HELLO, cbor2.dumps({"device_id": "a\nb", "secret": "s"})),
            ErrorCode.BAD_BODY,
            "control characters",
        ),
        (
            raw_frame(FrameType.HELLO, cbor2.dumps({"device_id": "d", "secret": "s"}), seq=5),
            ErrorCode.BAD_SEQ,
            "HELLO seq must be 0",
        ),
        (
            raw_frame(FrameType.HELLO, b"\xa2\x61a\x01\x61a\x02"),
            ErrorCode.INVALID_CBOR,
            "CBOR",
        ),
        (
            raw_frame(FrameType.ERROR, cbor2.dumps({"code": True, "message": ""})),
            ErrorCode.BAD_BODY,
            "code must be an integer",
        ),
        (
            raw_frame(FrameType.CLOSE, cbor2.dumps({"code": -1, "reason": ""})),
            ErrorCode.BAD_BODY,
            "code must be an integer",
        ),
        (
            raw_frame(FrameType.ERROR, cbor2.dumps({"code": 1, "message": "m" * 1025})),
            ErrorCode.BAD_BODY,
            "message must be 0..1024 UTF-8 bytes",
        ),
        (raw_frame(FrameType.CLOSE, b"\x81" * 40 + b"\x01"), ErrorCode.INVALID_CBOR, "depth"),
    ],
)
def test_invalid_frames_get_the_documented_code(
    wire: bytes, code: ErrorCode, fragment: str
) -> None:
    error = decode_error(wire)
    assert error.code is code
    assert fragment in str(error)
    assert str(error).startswith("frame #1 at stream offset 0: ")


def test_seq_is_checked_from_the_header_before_the_body_arrives() -> None:
    # FRAMES.md 4.1: header fields in wire order, then the body. A HELLO with seq 5 and a
    # garbage body is BAD_SEQ, and it is refused before its body is even received.
    wire = raw_frame(FrameType.HELLO, b"\xff" * 40, seq=5)
    assert decode_error(wire).code is ErrorCode.BAD_SEQ
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(wire[:15])
    assert info.value.code is ErrorCode.BAD_SEQ and info.value.offset == 7


def test_a_bad_body_is_reported_only_after_the_header_passed() -> None:
    # HELLO_OK from anyone with a malformed body: BAD_BODY (the type is known, flags/seq fine).
    wire = raw_frame(FrameType.HELLO_OK, cbor2.dumps({"max_frame_bytes": "big"}))
    assert decode_error(wire).code is ErrorCode.BAD_BODY


@pytest.mark.parametrize("value", [0, -1, "7", 2**64])
def test_hello_resume_seq_must_be_a_positive_seq(value: object) -> None:
    body = cbor2.dumps({"device_id": "d", "secret": "s", "resume_seq": value})
    error = decode_error(raw_frame(FrameType.HELLO, body))
    assert error.code is ErrorCode.BAD_BODY
    assert "resume_seq must be an integer in 1..18446744073709551615" in str(error)


def test_hello_without_resume_seq_decodes_as_zero_and_encodes_without_the_key() -> None:
    hello = decode_one(encode(Hello("d", "s")))
    assert hello.resume_seq == 0
    assert b"resume_seq" not in encode(hello)
    assert decode_one(encode(Hello("d", "s", resume_seq=9))).resume_seq == 9


def test_truncated_stream_is_reported_at_end_of_stream() -> None:
    decoder = FrameDecoder()
    wire = encode(Ping(1)) + encode(Data(5, b"abcdef"))[:9]
    assert decoder.feed(wire) == [Ping(1)]
    decoder.end_of_stream()
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.TRUNCATED
    assert "frame #2 at stream offset 15 after 9 bytes" in str(info.value)


def test_clean_end_of_stream_is_not_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(Ping(1)))
    decoder.end_of_stream()
    assert decoder.next_frame() is None


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: Data(0, b""), ErrorCode.BAD_SEQ),
        (lambda: Data(2**64, b""), ErrorCode.BAD_SEQ),
        (lambda: Push(1, "text"), ErrorCode.BAD_BODY),
        (lambda: Hello("", "s"), ErrorCode.BAD_BODY),
        (lambda: Hello("d" * 129, "s"), ErrorCode.BAD_BODY),
        (lambda: Hello("d", "\ud800"), ErrorCode.BAD_BODY),
        (lambda: HelloOk(10, 1, 0, 0), ErrorCode.BAD_BODY),
        (lambda: Close(1000, "r" * 2000), ErrorCode.BAD_BODY),
    ],
)
def test_encoder_refuses_frames_the_decoder_would_reject(build, code: ErrorCode) -> None:
    with pytest.raises(FrameError) as info:
        build()
    assert info.value.code is code


def test_decoder_refuses_a_limit_below_one_header() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes must be >= 15"):
        FrameDecoder(14)
