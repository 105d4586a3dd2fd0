"""Sans-I/O codec for gatewayd binary frames (wire spec: protocols/FRAMES.md).

Bytes in, frames out, like h11/wsproto: nothing here touches a socket, a clock or an event
loop, so the codec is exhaustively testable and reusable by device firmware test rigs.

    decoder = FrameDecoder(max_frame_bytes=65536)
    for frame in decoder.feed(chunk):      # raises FrameError on bad input
        ...
    sock.sendall(encode(Ack(seq=7)))

Every failure is a `FrameError` whose `code` is the spec's error code and whose message says
what is wrong and where (frame number and stream offset). Checks run in wire order (FRAMES.md
4.1): each header field (length, magic, type, flags, seq) as soon as its bytes arrive, so a bad
length is refused before any body byte is buffered; then the body (CBOR, then its shape).

This module must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

import enum
import io
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import cbor2

MAGIC_V1 = 0xA1
LENGTH_PREFIX_BYTES = 4
HEADER_BYTES = 11  # magic, type, flags, seq: everything `length` counts besides the body
MIN_FRAME_BYTES = LENGTH_PREFIX_BYTES + HEADER_BYTES
DEFAULT_MAX_FRAME_BYTES = 65536
MAX_SEQ = 2**64 - 1
MAX_UINT = 2**64 - 1
FLAG_RESEND = 0x01

MAX_DEVICE_ID_BYTES = 128
MAX_SECRET_BYTES = 256
MAX_CLIENT_BYTES = 128
MAX_MESSAGE_BYTES = 1024
# Bodies are flat maps; a little headroom lets future versions add nested keys we ignore.
_MAX_CBOR_DEPTH = 8

_HEADER = struct.Struct(">IBBBQ")  # length, magic, type, flags, seq


class FrameType(enum.IntEnum):
    HELLO = 0x01
    HELLO_OK = 0x02
    DATA = 0x10
    ACK = 0x11
    PUSH = 0x12
    PING = 0x20
    PONG = 0x21
    ERROR = 0x30
    CLOSE = 0x31


class ErrorCode(enum.IntEnum):
    """Codes shared by ERROR and CLOSE frames (FRAMES.md section 4)."""

    BAD_MAGIC = 1
    FRAME_TOO_LARGE = 2
    UNKNOWN_TYPE = 3
    BAD_FLAGS = 4
    INVALID_CBOR = 5
    BAD_BODY = 6
    BAD_SEQ = 7
    BAD_LENGTH = 8
    TRUNCATED = 9
    HELLO_REQUIRED = 16
    AUTH_FAILED = 17
    RATE_LIMITED = 18
    UNEXPECTED = 19
    WINDOW_EXCEEDED = 20
    HELLO_TIMEOUT = 21
    PING_TIMEOUT = 22
    SERVER_BUSY = 23
    SLOW_CONSUMER = 24
    NOT_APPLIED = 32
    REJECTED = 33
    NORMAL = 1000
    GOING_AWAY = 1001
    REPLACED = 1002


class FrameError(Exception):
    """Malformed or invalid frame. `code` is the ErrorCode to report to the peer.

    `offset` is the stream offset of the offending byte (None when encoding). `frames_before`
    holds frames that `FrameDecoder.feed` decoded from the same call before the error.
    """

    def __init__(self, code: ErrorCode, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.offset = offset
        self.frames_before: tuple[Frame, ...] = ()


def _fail(code: ErrorCode, message: str) -> FrameError:
    return FrameError(code, message)


def _check_uint(name: str, value: object, *, low: int = 0, high: int = MAX_UINT) -> None:
    if type(value) is not int or not low <= value <= high:
        raise _fail(
            ErrorCode.BAD_BODY, f"{name} must be an integer in {low}..{high}, got {value!r}"
        )


def _check_seq(kind: str, seq: object, *, low: int, high: int = MAX_SEQ) -> None:
    if type(seq) is not int or not low <= seq <= high:
        expected = "0" if high == 0 else f"{low}..2^64-1"
        raise _fail(ErrorCode.BAD_SEQ, f"{kind} seq must be {expected}, got {seq!r}")


def _check_text(name: str, value: object, *, min_bytes: int, max_bytes: int) -> None:
    if type(value) is not str:
        raise _fail(ErrorCode.BAD_BODY, f"{name} must be a text string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _fail(ErrorCode.BAD_BODY, f"{name} is not encodable as UTF-8") from None
    if not min_bytes <= size <= max_bytes:
        raise _fail(
            ErrorCode.BAD_BODY, f"{name} must be {min_bytes}..{max_bytes} UTF-8 bytes, got {size}"
        )


def _check_bytes(name: str, value: object) -> None:
    if type(value) is not bytes:
        raise _fail(ErrorCode.BAD_BODY, f"{name} must be a byte string, got {type(value).__name__}")


def _normalize_code(frame: Error | Close) -> None:
    # Accept ErrorCode members but store plain ints, so decoded and built frames compare equal.
    if isinstance(frame.code, enum.IntEnum):
        object.__setattr__(frame, "code", int(frame.code))


@dataclass(frozen=True, slots=True)
class Hello:
    """Device -> gateway: authenticate. The secret is kept out of repr (log lines)."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    device_id: str
    secret: str = field(repr=False)
    client: str = ""
    # The seq of the first DATA frame the device sends on this connection (its oldest
    # unacknowledged frame, or its next new seq); 0 = not announced. FRAMES.md 5.5.
    resume_seq: int = 0

    def __post_init__(self) -> None:
        _check_text("device_id", self.device_id, min_bytes=1, max_bytes=MAX_DEVICE_ID_BYTES)
        if any(ch < " " or ch == "\x7f" for ch in self.device_id):
            raise _fail(ErrorCode.BAD_BODY, "device_id must not contain control characters")
        _check_text("secret", self.secret, min_bytes=1, max_bytes=MAX_SECRET_BYTES)
        _check_text("client", self.client, min_bytes=0, max_bytes=MAX_CLIENT_BYTES)
        _check_uint("resume_seq", self.resume_seq, high=MAX_SEQ)


@dataclass(frozen=True, slots=True)
class HelloOk:
    """Gateway -> device: authenticated; announces the limits and the push epoch."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO_OK
    max_frame_bytes: int
    max_unacked: int
    ping_interval_ms: int
    push_epoch: int

    def __post_init__(self) -> None:
        _check_uint("max_frame_bytes", self.max_frame_bytes, low=MIN_FRAME_BYTES)
        _check_uint("max_unacked", self.max_unacked, low=1)
        _check_uint("ping_interval_ms", self.ping_interval_ms)
        _check_uint("push_epoch", self.push_epoch)


@dataclass(frozen=True, slots=True)
class Data:
    """Device -> gateway: one payload with the device's persistent seq (>= 1)."""

    TYPE: ClassVar[FrameType] = FrameType.DATA
    seq: int
    payload: bytes
    resend: bool = False

    def __post_init__(self) -> None:
        _check_seq("DATA", self.seq, low=1)
        _check_bytes("DATA payload", self.payload)


@dataclass(frozen=True, slots=True)
class Ack:
    """Either direction: the DATA (or PUSH) with this seq is durably processed."""

    TYPE: ClassVar[FrameType] = FrameType.ACK
    seq: int

    def __post_init__(self) -> None:
        _check_seq("ACK", self.seq, low=1)


@dataclass(frozen=True, slots=True)
class Push:
    """Gateway -> device: a payload from the agent with the gateway's push seq (>= 1)."""

    TYPE: ClassVar[FrameType] = FrameType.PUSH
    seq: int
    payload: bytes
    resend: bool = False

    def __post_init__(self) -> None:
        _check_seq("PUSH", self.seq, low=1)
        _check_bytes("PUSH payload", self.payload)


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[FrameType] = FrameType.PING
    seq: int = 0

    def __post_init__(self) -> None:
        _check_seq("PING", self.seq, low=0)


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[FrameType] = FrameType.PONG
    seq: int = 0

    def __post_init__(self) -> None:
        _check_seq("PONG", self.seq, low=0)


@dataclass(frozen=True, slots=True)
class Error:
    """Either direction: `code` (ErrorCode, or one this version does not know) about `seq`."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    code: int
    message: str = ""
    seq: int = 0

    def __post_init__(self) -> None:
        _normalize_code(self)
        _check_uint("code", self.code)
        _check_text("message", self.message, min_bytes=0, max_bytes=MAX_MESSAGE_BYTES)
        _check_seq("ERROR", self.seq, low=0)


@dataclass(frozen=True, slots=True)
class Close:
    """Either direction: orderly close with a code from the shared table."""

    TYPE: ClassVar[FrameType] = FrameType.CLOSE
    code: int = ErrorCode.NORMAL.value
    reason: str = ""

    def __post_init__(self) -> None:
        _normalize_code(self)
        _check_uint("code", self.code)
        _check_text("reason", self.reason, min_bytes=0, max_bytes=MAX_MESSAGE_BYTES)


Frame = Hello | HelloOk | Data | Ack | Push | Ping | Pong | Error | Close

_EMPTY_BODY_TYPES = frozenset({FrameType.ACK, FrameType.PING, FrameType.PONG})
_PAYLOAD_TYPES = frozenset({FrameType.DATA, FrameType.PUSH})
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
# The seq range of each type (FRAMES.md section 2), checked from the header, before the body.
_SEQ_RANGES = {
    FrameType.HELLO: (0, 0),
    FrameType.HELLO_OK: (0, 0),
    FrameType.CLOSE: (0, 0),
    FrameType.DATA: (1, MAX_SEQ),
    FrameType.ACK: (1, MAX_SEQ),
    FrameType.PUSH: (1, MAX_SEQ),
}


# ---------------------------------------------------------------- encoding


def _bstr_header(size: int) -> bytes:
    # CBOR major type 2 (byte string) with the shortest length encoding, written by hand
    # because DATA/PUSH are the hot path and cbor2.dumps would copy the payload once more.
    if size < 24:
        return bytes((0x40 | size,))
    if size < 0x100:
        return bytes((0x58, size))
    if size < 0x10000:
        return b"\x59" + size.to_bytes(2, "big")
    return b"\x5a" + size.to_bytes(4, "big")


def _body_bytes(frame: Frame) -> bytes:
    if isinstance(frame, Data | Push):
        return _bstr_header(len(frame.payload)) + frame.payload
    if isinstance(frame, Ack | Ping | Pong):
        return b""
    if isinstance(frame, Hello):
        body: dict[str, object] = {"device_id": frame.device_id, "secret": frame.secret}
        if frame.client:
            body["client"] = frame.client
        if frame.resume_seq:
            body["resume_seq"] = frame.resume_seq
    elif isinstance(frame, HelloOk):
        body = {
            "max_frame_bytes": frame.max_frame_bytes,
            "max_unacked": frame.max_unacked,
            "ping_interval_ms": frame.ping_interval_ms,
            "push_epoch": frame.push_epoch,
        }
    elif isinstance(frame, Error):
        body = {"code": frame.code, "message": frame.message}
    elif isinstance(frame, Close):
        body = {"code": frame.code, "reason": frame.reason}
    else:
        raise TypeError(f"not a frame: {frame!r}")
    return cbor2.dumps(body)


def encode(frame: Frame) -> bytes:
    """The complete wire bytes of `frame` (length prefix included)."""
    body = _body_bytes(frame)
    seq = getattr(frame, "seq", 0)
    flags = FLAG_RESEND if getattr(frame, "resend", False) else 0
    return _HEADER.pack(HEADER_BYTES + len(body), MAGIC_V1, frame.TYPE, flags, seq) + body


def encode_ack(seq: int) -> bytes:
    """`encode(Ack(seq))` for a seq already known to be valid (the gateway's hot path: the
    seq of a DATA frame it decoded), without building the frame object."""
    return _HEADER.pack(HEADER_BYTES, MAGIC_V1, _ACK_TYPE, 0, seq)


_ACK_TYPE = int(FrameType.ACK)
_DATA_TYPE = int(FrameType.DATA)
_set_seq = vars(Data)["seq"].__set__  # the slots' descriptors bypass the frozen __setattr__
_set_payload = vars(Data)["payload"].__set__
_set_resend = vars(Data)["resend"].__set__


def _valid_data(seq: int, payload: bytes, resend: bool) -> Data:
    # Data(...) without __init__/__post_init__: the decoder has checked seq and payload.
    frame = object.__new__(Data)
    _set_seq(frame, seq)
    _set_payload(frame, payload)
    _set_resend(frame, resend)
    return frame


# ---------------------------------------------------------------- decoding


def _decode_cbor(body: bytes) -> object:
    fp = io.BytesIO(body)
    try:
        decoder = cbor2.CBORDecoder(
            fp,
            max_depth=_MAX_CBOR_DEPTH,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        item = decoder.decode()
    except Exception as exc:  # cbor2 raises several types (decode, value, overflow errors)
        raise _fail(ErrorCode.INVALID_CBOR, f"body is not valid CBOR ({exc})") from None
    if fp.tell() != len(body):
        raise _fail(
            ErrorCode.INVALID_CBOR,
            f"body has {len(body) - fp.tell()} trailing bytes after its CBOR item",
        )
    return item


def _decode_payload(body: bytes) -> bytes:
    # Fast path for a definite-length byte string; anything else goes through cbor2 so the
    # accepted language is exactly "one CBOR byte string".
    if body:
        initial = body[0]
        info = initial & 0x1F
        if initial >> 5 == 2 and info < 28:
            if info < 24:
                start, size = 1, info
            else:
                start = 1 + (1 << (info - 24))
                size = int.from_bytes(body[1:start], "big")
            if len(body) == start + size:
                return body[start:]
    item = _decode_cbor(body)
    if type(item) is not bytes:
        raise _fail(
            ErrorCode.BAD_BODY, f"body must be a CBOR byte string, got {type(item).__name__}"
        )
    return item


def _decode_map(kind: str, body: bytes) -> dict[object, object]:
    if not body:
        raise _fail(ErrorCode.BAD_BODY, f"{kind} body must be a CBOR map, got an empty body")
    item = _decode_cbor(body)
    if type(item) is not dict:
        raise _fail(
            ErrorCode.BAD_BODY, f"{kind} body must be a CBOR map, got {type(item).__name__}"
        )
    return item


def _require(kind: str, body: dict[object, object], key: str) -> object:
    if key not in body:
        raise _fail(ErrorCode.BAD_BODY, f"{kind} body is missing {key!r}")
    return body[key]


def _build_frame(frame_type: FrameType, flags: int, seq: int, body: bytes) -> Frame:
    resend = bool(flags & FLAG_RESEND)
    name = frame_type.name
    if frame_type in _EMPTY_BODY_TYPES:
        if body:
            raise _fail(ErrorCode.BAD_BODY, f"{name} body must be empty, got {len(body)} bytes")
        if frame_type is FrameType.ACK:
            return Ack(seq)
        return Ping(seq) if frame_type is FrameType.PING else Pong(seq)
    if frame_type in _PAYLOAD_TYPES:
        payload = _decode_payload(body)
        if frame_type is FrameType.DATA:
            return Data(seq, payload, resend)
        return Push(seq, payload, resend)
    fields = _decode_map(name, body)
    if frame_type is FrameType.HELLO:
        resume_seq = fields.get("resume_seq")
        if resume_seq is not None:
            _check_uint("resume_seq", resume_seq, low=1, high=MAX_SEQ)
        return Hello(
            device_id=_require(name, fields, "device_id"),  # type: ignore[arg-type]
            secret=_require(name, fields, "secret"),  # type: ignore[arg-type]
            client=fields.get("client", ""),  # type: ignore[arg-type]
            resume_seq=resume_seq or 0,  # type: ignore[arg-type]
        )
    if frame_type is FrameType.HELLO_OK:
        return HelloOk(
            **{  # type: ignore[arg-type]
                key: _require(name, fields, key)
                for key in ("max_frame_bytes", "max_unacked", "ping_interval_ms", "push_epoch")
            }
        )
    if frame_type is FrameType.ERROR:
        return Error(
            code=_require(name, fields, "code"),  # type: ignore[arg-type]
            message=_require(name, fields, "message"),  # type: ignore[arg-type]
            seq=seq,
        )
    return Close(
        code=_require(name, fields, "code"),  # type: ignore[arg-type]
        reason=_require(name, fields, "reason"),  # type: ignore[arg-type]
    )


class FrameDecoder:
    """Incremental decoder for one byte stream.

    `receive_data(data)` consumes bytes, `next_frame()` returns the next complete frame or None,
    and raises `FrameError` once it reaches bad input; `feed(data)` does both and returns a list.
    After an error the decoder is dead: it drops further data and keeps raising that error.
    Between calls it buffers at most one partial frame, which is always smaller than
    `max_frame_bytes`.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < MIN_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be >= {MIN_FRAME_BYTES}, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._buffer_offset = 0  # stream offset of self._buffer[0]
        self._frames_seen = 0
        self._ready: deque[Frame] = deque()
        self._error: FrameError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held until more data arrives."""
        return len(self._buffer)

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def frames_decoded(self) -> int:
        """Complete, valid frames decoded so far (whether or not `next_frame` returned them)."""
        return self._frames_seen

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            return
        # Usually reads end on a frame boundary: parse `data` itself, copy only a remainder.
        buf: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buf = self._buffer
        else:
            buf = data
        try:
            consumed = self._parse(buf)
        except FrameError as error:
            self._error = error
            self._buffer.clear()
            return
        if buf is self._buffer:
            if consumed:
                del self._buffer[:consumed]
        elif consumed < len(data):
            self._buffer += memoryview(data)[consumed:]
        self._buffer_offset += consumed

    def end_of_stream(self) -> None:
        """The peer will send no more bytes; a partial frame becomes a TRUNCATED error."""
        if self._error is None and self._buffer:
            self._error = FrameError(
                ErrorCode.TRUNCATED,
                f"stream ended inside frame #{self._frames_seen + 1} at stream offset "
                f"{self._buffer_offset} after {len(self._buffer)} bytes",
                self._buffer_offset + len(self._buffer),
            )
            self._buffer.clear()

    def next_frame(self) -> Frame | None:
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def feed(self, data: bytes) -> list[Frame]:
        """receive_data + every ready frame; on error, raises with `frames_before` set."""
        self.receive_data(data)
        frames: list[Frame] = []
        try:
            while (frame := self.next_frame()) is not None:
                frames.append(frame)
        except FrameError as error:
            error.frames_before = tuple(frames)
            raise
        return frames

    def _located(self, error: FrameError, frame_start: int, field_offset: int) -> FrameError:
        where = self._buffer_offset + frame_start
        located = FrameError(
            error.code,
            f"frame #{self._frames_seen + 1} at stream offset {where}: {error.message}",
            where + field_offset,
        )
        return located

    def _parse(self, buf: bytes | bytearray) -> int:
        size = len(buf)
        pos = 0
        max_length = self.max_frame_bytes - LENGTH_PREFIX_BYTES
        unpack_header = _HEADER.unpack_from
        while size - pos >= LENGTH_PREFIX_BYTES:
            available = size - pos
            if available >= MIN_FRAME_BYTES:
                # Fast path for a well-formed DATA frame with a definite-length byte string
                # body: every check of the general path below, in fewer steps. Anything else
                # (other types, every error) takes the general path.
                length, magic, frame_type_byte, flags, seq = unpack_header(buf, pos)
                if (
                    frame_type_byte == _DATA_TYPE
                    and magic == MAGIC_V1
                    and flags | FLAG_RESEND == FLAG_RESEND
                    and seq
                    and HEADER_BYTES < length <= max_length
                ):
                    end = pos + LENGTH_PREFIX_BYTES + length
                    if end > size:
                        break
                    initial = buf[pos + MIN_FRAME_BYTES]
                    info = initial & 0x1F
                    if initial >> 5 == 2 and info < 27:
                        start = pos + MIN_FRAME_BYTES + 1
                        if info < 24:
                            payload_size = info
                        else:
                            width = 1 << (info - 24)
                            payload_size = int.from_bytes(buf[start : start + width], "big")
                            start += width
                        if start + payload_size == end:
                            self._ready.append(_valid_data(seq, bytes(buf[start:end]), flags == 1))
                            self._frames_seen += 1
                            pos = end
                            continue
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if LENGTH_PREFIX_BYTES + length > self.max_frame_bytes:
                raise self._located(
                    _fail(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"length {length} makes a {length + 4}-byte frame, "
                        f"over the {self.max_frame_bytes}-byte limit",
                    ),
                    pos,
                    0,
                )
            if length < HEADER_BYTES:
                raise self._located(
                    _fail(
                        ErrorCode.BAD_LENGTH,
                        f"length {length} is below the {HEADER_BYTES}-byte header",
                    ),
                    pos,
                    0,
                )
            # Check header fields as soon as they arrive, so garbage fails early.
            if available > 4 and buf[pos + 4] != MAGIC_V1:
                raise self._located(
                    _fail(
                        ErrorCode.BAD_MAGIC,
                        f"magic/version byte is 0x{buf[pos + 4]:02x}, expected 0x{MAGIC_V1:02x}",
                    ),
                    pos,
                    4,
                )
            if available > 5 and buf[pos + 5] not in _KNOWN_TYPES:
                raise self._located(
                    _fail(ErrorCode.UNKNOWN_TYPE, f"frame type 0x{buf[pos + 5]:02x} unknown"),
                    pos,
                    5,
                )
            if available > 6:
                frame_type = FrameType(buf[pos + 5])
                flags = buf[pos + 6]
                allowed = FLAG_RESEND if frame_type in _PAYLOAD_TYPES else 0
                if flags & ~allowed:
                    raise self._located(
                        _fail(
                            ErrorCode.BAD_FLAGS,
                            f"flags 0x{flags:02x} not allowed on {frame_type.name} "
                            f"(allowed mask 0x{allowed:02x})",
                        ),
                        pos,
                        6,
                    )
            if available < MIN_FRAME_BYTES:
                break
            seq = int.from_bytes(buf[pos + 7 : pos + 15], "big")
            seq_range = _SEQ_RANGES.get(frame_type)
            if seq_range is not None:
                try:
                    _check_seq(frame_type.name, seq, low=seq_range[0], high=seq_range[1])
                except FrameError as error:
                    raise self._located(error, pos, 7) from None
            end = pos + LENGTH_PREFIX_BYTES + length
            if end > size:
                break
            body = bytes(buf[pos + 15 : end])
            try:
                frame = _build_frame(frame_type, flags, seq, body)
            except FrameError as error:
                raise self._located(error, pos, 15) from None
            self._ready.append(frame)
            self._frames_seen += 1
            pos = end
        return pos
