"""MQTT 3.1.1 (protocol level 4) and 5 packets: encode to bytes, decode from bytes.

`encode(packet, version)` gives a packet's bytes; `StreamDecoder(version).feed(data)` splits
a byte stream cut at arbitrary points into packets. Anything malformed raises
`ProtocolError`, which names the packet type and what was wrong with it. MQTT 5 properties are
a `dict` from property name (`"session_expiry_interval"`, ...) to value; the repeatable ones
(`user_property`, `subscription_identifier`) are lists.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "MAX_REMAINING_LENGTH",
    "Auth",
    "ConnAck",
    "Connect",
    "Disconnect",
    "Packet",
    "PingReq",
    "PingResp",
    "ProtocolError",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "StreamDecoder",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "Will",
    "decode_packet",
    "encode",
    "encode_varint",
]

V311 = 4
V5 = 5
MAX_REMAINING_LENGTH = 268_435_455  # 4 varint bytes

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

PACKET_NAMES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "AUTH",
}

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class ProtocolError(ValueError):
    """Bytes that are not valid MQTT (or a packet that cannot be encoded); the message says
    which packet and what is wrong."""


Properties = dict[str, Any]

# id -> (name, kind); kinds: b byte, h u16, i u32, v varint, s utf-8, d binary, p string pair
_PROPERTY_SPECS: dict[int, tuple[str, str]] = {
    0x01: ("payload_format_indicator", "b"),
    0x02: ("message_expiry_interval", "i"),
    0x03: ("content_type", "s"),
    0x08: ("response_topic", "s"),
    0x09: ("correlation_data", "d"),
    0x0B: ("subscription_identifier", "v"),
    0x11: ("session_expiry_interval", "i"),
    0x12: ("assigned_client_identifier", "s"),
    0x13: ("server_keep_alive", "h"),
    0x15: ("authentication_method", "s"),
    0x16: ("authentication_data", "d"),
    0x17: ("request_problem_information", "b"),
    0x18: ("will_delay_interval", "i"),
    0x19: ("request_response_information", "b"),
    0x1A: ("response_information", "s"),
    0x1C: ("server_reference", "s"),
    0x1F: ("reason_string", "s"),
    0x21: ("receive_maximum", "h"),
    0x22: ("topic_alias_maximum", "h"),
    0x23: ("topic_alias", "h"),
    0x24: ("maximum_qos", "b"),
    0x25: ("retain_available", "b"),
    0x26: ("user_property", "p"),
    0x27: ("maximum_packet_size", "i"),
    0x28: ("wildcard_subscription_available", "b"),
    0x29: ("subscription_identifier_available", "b"),
    0x2A: ("shared_subscription_available", "b"),
}
_PROPERTY_IDS = {name: (pid, kind) for pid, (name, kind) in _PROPERTY_SPECS.items()}
REPEATABLE = frozenset({"user_property", "subscription_identifier"})
PROPERTY_NAMES = frozenset(_PROPERTY_IDS)


# ----------------------------------------------------------------------------- packets


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    TYPE: ClassVar[int] = CONNECT
    client_id: str
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class ConnAck:
    TYPE: ClassVar[int] = CONNACK
    session_present: bool = False
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Publish:
    TYPE: ClassVar[int] = PUBLISH
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class _Ack:
    TYPE: ClassVar[int] = 0
    FLAGS: ClassVar[int] = 0
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PubAck(_Ack):
    TYPE: ClassVar[int] = PUBACK


@dataclass(slots=True)
class PubRec(_Ack):
    TYPE: ClassVar[int] = PUBREC


@dataclass(slots=True)
class PubRel(_Ack):
    TYPE: ClassVar[int] = PUBREL
    FLAGS: ClassVar[int] = 0x02


@dataclass(slots=True)
class PubComp(_Ack):
    TYPE: ClassVar[int] = PUBCOMP


@dataclass(slots=True)
class Subscribe:
    TYPE: ClassVar[int] = SUBSCRIBE
    packet_id: int
    # (filter, options): options bits 0-1 QoS; MQTT 5 also 2 no-local, 3 retain-as-published,
    # 4-5 retain handling
    subscriptions: list[tuple[str, int]]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class SubAck:
    TYPE: ClassVar[int] = SUBACK
    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Unsubscribe:
    TYPE: ClassVar[int] = UNSUBSCRIBE
    packet_id: int
    filters: list[str]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class UnsubAck:
    TYPE: ClassVar[int] = UNSUBACK
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)  # MQTT 5 only
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PingReq:
    TYPE: ClassVar[int] = PINGREQ


@dataclass(slots=True)
class PingResp:
    TYPE: ClassVar[int] = PINGRESP


@dataclass(slots=True)
class Disconnect:
    TYPE: ClassVar[int] = DISCONNECT
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Auth:
    TYPE: ClassVar[int] = AUTH
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)

# ----------------------------------------------------------------------------- primitives


def encode_varint(value: int) -> bytes:
    """The variable byte integer (remaining length, property lengths): 1-4 bytes."""
    if value < 0x80:
        if value < 0:
            raise ProtocolError(f"variable byte integer must be >= 0, got {value}")
        return bytes((value,))
    if value > MAX_REMAINING_LENGTH:
        raise ProtocolError(
            f"variable byte integer {value} exceeds the maximum {MAX_REMAINING_LENGTH}"
        )
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= len(data):
            raise ProtocolError(f"{what}: truncated variable byte integer")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ProtocolError(f"{what}: variable byte integer longer than 4 bytes")


def _str(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ProtocolError(f"{what} is {len(raw)} bytes of UTF-8; the maximum is 65535")
    return _U16.pack(len(raw)) + raw


def _bin(value: bytes, what: str) -> bytes:
    if len(value) > 0xFFFF:
        raise ProtocolError(f"{what} is {len(value)} bytes; the maximum is 65535")
    return _U16.pack(len(value)) + value


def _read_u16(data: bytes, pos: int, what: str) -> tuple[int, int]:
    if pos + 2 > len(data):
        raise ProtocolError(f"{what}: truncated (needs 2 bytes at offset {pos})")
    return (data[pos] << 8) | data[pos + 1], pos + 2


def _read_bin(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    n, pos = _read_u16(data, pos, what)
    end = pos + n
    if end > len(data):
        raise ProtocolError(f"{what}: length {n} runs past the end of the packet")
    return bytes(data[pos:end]), end


def _read_str(data: bytes, pos: int, what: str) -> tuple[str, int]:
    raw, pos = _read_bin(data, pos, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: not valid UTF-8 ({exc.reason})") from None
    if "\x00" in text:
        raise ProtocolError(f"{what}: contains U+0000, which MQTT forbids")
    return text, pos


# ----------------------------------------------------------------------------- properties


def encode_properties(properties: Properties) -> bytes:
    """MQTT 5 properties with their varint length prefix (b"\\x00" when empty)."""
    if not properties:
        return b"\x00"
    out = bytearray()
    for name, value in properties.items():
        spec = _PROPERTY_IDS.get(name)
        if spec is None:
            raise ProtocolError(f"unknown MQTT 5 property {name!r}")
        pid, kind = spec
        values = value if name in REPEATABLE else (value,)
        for item in values:
            out += bytes((pid,))
            try:
                if kind == "b":
                    out += bytes((item,))
                elif kind == "h":
                    out += _U16.pack(item)
                elif kind == "i":
                    out += _U32.pack(item)
                elif kind == "v":
                    out += encode_varint(item)
                elif kind == "s":
                    out += _str(item, f"property {name}")
                elif kind == "d":
                    out += _bin(bytes(item), f"property {name}")
                else:
                    key, val = item
                    out += _str(key, f"property {name} key") + _str(val, f"property {name} value")
            except (struct.error, ValueError, TypeError) as exc:
                if isinstance(exc, ProtocolError):
                    raise
                raise ProtocolError(f"property {name}: cannot encode {item!r} ({exc})") from None
    return encode_varint(len(out)) + bytes(out)


def _decode_properties(data: bytes, pos: int, what: str) -> tuple[Properties, int]:
    length, pos = _decode_varint(data, pos, f"{what} property length")
    if length == 0:
        return {}, pos
    end = pos + length
    if end > len(data):
        raise ProtocolError(f"{what}: property length {length} runs past the end of the packet")
    props: Properties = {}
    chunk = data[:end]
    while pos < end:
        pid, pos = _decode_varint(chunk, pos, f"{what} property id")
        spec = _PROPERTY_SPECS.get(pid)
        if spec is None:
            raise ProtocolError(f"{what}: unknown property id {pid:#x}")
        name, kind = spec
        value: Any
        if kind == "b":
            if pos >= end:
                raise ProtocolError(f"{what}: property {name} truncated")
            value, pos = chunk[pos], pos + 1
        elif kind == "h":
            value, pos = _read_u16(chunk, pos, f"{what} property {name}")
        elif kind == "i":
            if pos + 4 > end:
                raise ProtocolError(f"{what}: property {name} truncated")
            value, pos = _U32.unpack_from(chunk, pos)[0], pos + 4
        elif kind == "v":
            value, pos = _decode_varint(chunk, pos, f"{what} property {name}")
        elif kind == "s":
            value, pos = _read_str(chunk, pos, f"{what} property {name}")
        elif kind == "d":
            value, pos = _read_bin(chunk, pos, f"{what} property {name}")
        else:
            key, pos = _read_str(chunk, pos, f"{what} property {name} key")
            val, pos = _read_str(chunk, pos, f"{what} property {name} value")
            value = (key, val)
        if name in REPEATABLE:
            props.setdefault(name, []).append(value)
        elif name in props:
            raise ProtocolError(f"{what}: property {name} appears twice")
        else:
            props[name] = value
    return props, pos


# ----------------------------------------------------------------------------- encode


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _check_qos(qos: int, what: str) -> None:
    if qos not in (0, 1, 2):
        raise ProtocolError(f"{what}: QoS must be 0, 1 or 2, got {qos!r}")


def _check_packet_id(packet_id: int, what: str) -> None:
    if not 0 < packet_id <= 0xFFFF:
        raise ProtocolError(f"{what}: packet id must be 1..65535, got {packet_id!r}")


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int,
    properties: Properties | None,
    version: int,
) -> bytes:
    """One PUBLISH's bytes (the hot path: no packet object needed)."""
    raw_topic = topic.encode("utf-8")
    n = len(raw_topic)
    if n > 0xFFFF:
        raise ProtocolError(f"PUBLISH topic is {n} bytes of UTF-8; the maximum is 65535")
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if qos:
        if not 0 < packet_id <= 0xFFFF:
            _check_packet_id(packet_id, "PUBLISH")
        head = bytes((n >> 8, n & 0xFF)) + raw_topic + bytes((packet_id >> 8, packet_id & 0xFF))
    else:
        _check_qos(qos, "PUBLISH")
        head = bytes((n >> 8, n & 0xFF)) + raw_topic
    if version == V5:
        head += encode_properties(properties) if properties else b"\x00"
    length = len(head) + len(payload)
    if length < 0x80:
        return bytes((first, length)) + head + payload
    return bytes((first,)) + encode_varint(length) + head + payload


def encode_puback(packet_id: int) -> bytes:
    """A PUBACK with reason 0 (success) and no properties: the same 4 bytes in 3.1.1 and 5."""
    return bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF))


def encode(packet: Packet, version: int = V311) -> bytes:
    """`packet`'s bytes for protocol `version` (4: 3.1.1, 5: MQTT 5).

    Raises `ProtocolError` for what cannot be encoded (a QoS of 3, an id of 0, a 70 kB topic,
    an unknown property)."""
    if version not in (V311, V5):
        raise ProtocolError(f"protocol version must be 4 (3.1.1) or 5, got {version!r}")
    v5 = version == V5
    if isinstance(packet, Publish):
        _check_qos(packet.qos, "PUBLISH")
        return encode_publish(
            packet.topic,
            bytes(packet.payload),
            packet.qos,
            packet.retain,
            packet.dup,
            packet.packet_id,
            packet.properties,
            version,
        )
    if isinstance(packet, _Ack):
        _check_packet_id(packet.packet_id, PACKET_NAMES[packet.TYPE])
        body = _U16.pack(packet.packet_id)
        if v5 and (packet.reason_code or packet.properties):
            body += bytes((packet.reason_code,))
            if packet.properties:
                body += encode_properties(packet.properties)
        return _frame((packet.TYPE << 4) | packet.FLAGS, body)
    if isinstance(packet, Connect):
        return _encode_connect(packet, version)
    if isinstance(packet, ConnAck):
        body = bytes((1 if packet.session_present else 0, packet.reason_code))
        if v5:
            body += encode_properties(packet.properties)
        return _frame(0x20, body)
    if isinstance(packet, Subscribe):
        _check_packet_id(packet.packet_id, "SUBSCRIBE")
        if not packet.subscriptions:
            raise ProtocolError("SUBSCRIBE needs at least one topic filter")
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        for topic_filter, options in packet.subscriptions:
            _check_qos(options & 0x03, f"SUBSCRIBE {topic_filter!r}")
            if not 0 <= options <= (0x3F if v5 else 0x03):
                raise ProtocolError(f"SUBSCRIBE {topic_filter!r}: invalid options {options:#x}")
            body += _str(topic_filter, "SUBSCRIBE topic filter") + bytes((options,))
        return _frame(0x82, body)
    if isinstance(packet, SubAck):
        _check_packet_id(packet.packet_id, "SUBACK")
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        return _frame(0x90, body + bytes(packet.reason_codes))
    if isinstance(packet, Unsubscribe):
        _check_packet_id(packet.packet_id, "UNSUBSCRIBE")
        if not packet.filters:
            raise ProtocolError("UNSUBSCRIBE needs at least one topic filter")
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        for topic_filter in packet.filters:
            body += _str(topic_filter, "UNSUBSCRIBE topic filter")
        return _frame(0xA2, body)
    if isinstance(packet, UnsubAck):
        _check_packet_id(packet.packet_id, "UNSUBACK")
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties) + bytes(packet.reason_codes)
        return _frame(0xB0, body)
    if isinstance(packet, PingReq):
        return b"\xc0\x00"
    if isinstance(packet, PingResp):
        return b"\xd0\x00"
    if isinstance(packet, Disconnect | Auth):
        body = b""
        if v5 and (packet.reason_code or packet.properties):
            body = bytes((packet.reason_code,))
            if packet.properties:
                body += encode_properties(packet.properties)
        elif isinstance(packet, Auth) and not v5:
            raise ProtocolError("AUTH exists only in MQTT 5")
        return _frame((packet.TYPE << 4), body)
    raise ProtocolError(f"cannot encode {type(packet).__name__}: not an MQTT packet")


def _encode_connect(packet: Connect, version: int) -> bytes:
    v5 = version == V5
    flags = 0x02 if packet.clean_start else 0
    will = packet.will
    if will is not None:
        _check_qos(will.qos, "CONNECT will")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if packet.username is not None:
        flags |= 0x80
    if packet.password is not None:
        if packet.username is None and not v5:
            raise ProtocolError("CONNECT: MQTT 3.1.1 allows a password only with a username")
        flags |= 0x40
    if not 0 <= packet.keepalive <= 0xFFFF:
        raise ProtocolError(f"CONNECT: keepalive must be 0..65535 s, got {packet.keepalive}")
    body = b"\x00\x04MQTT" + bytes((version, flags)) + _U16.pack(packet.keepalive)
    if v5:
        body += encode_properties(packet.properties)
    body += _str(packet.client_id, "CONNECT client id")
    if will is not None:
        if v5:
            body += encode_properties(will.properties)
        body += _str(will.topic, "CONNECT will topic") + _bin(will.payload, "CONNECT will payload")
    if packet.username is not None:
        body += _str(packet.username, "CONNECT username")
    if packet.password is not None:
        body += _bin(packet.password, "CONNECT password")
    return _frame(0x10, body)


# ----------------------------------------------------------------------------- decode

# the fixed header's flags each packet type must carry (PUBLISH's are free)
_REQUIRED_FLAGS = {t: 0 for t in range(1, 16)}
_REQUIRED_FLAGS.update({PUBREL: 0x02, SUBSCRIBE: 0x02, UNSUBSCRIBE: 0x02})
_ACKS: dict[int, type[PubAck | PubRec | PubRel | PubComp]] = {
    PUBACK: PubAck,
    PUBREC: PubRec,
    PUBREL: PubRel,
    PUBCOMP: PubComp,
}


def decode_packet(first: int, body: bytes, version: int = V311) -> Packet:
    """One packet from its fixed header's first byte and its body (the remaining length's
    bytes). Raises `ProtocolError` naming the packet type and the problem."""
    kind = first >> 4
    name = PACKET_NAMES.get(kind)
    if name is None:
        raise ProtocolError(f"packet type 0 is reserved (first byte {first:#04x})")
    flags = first & 0x0F
    v5 = version == V5
    if kind == PUBLISH:
        return _decode_publish(flags, body, v5)
    if flags != _REQUIRED_FLAGS[kind]:
        raise ProtocolError(
            f"{name}: fixed-header flags must be {_REQUIRED_FLAGS[kind]:#x}, got {flags:#x}"
        )
    n = len(body)
    if kind in _ACKS:
        if n < 2:
            raise ProtocolError(f"{name}: {n} bytes; needs at least a 2-byte packet id")
        packet_id = (body[0] << 8) | body[1]
        if packet_id == 0:
            raise ProtocolError(f"{name}: packet id 0 is not allowed")
        if n == 2:
            return _ACKS[kind](packet_id)
        if not v5:
            raise ProtocolError(f"{name}: {n} bytes; MQTT 3.1.1 allows exactly 2")
        props: Properties = {}
        pos = 3
        if n > 3:
            props, pos = _decode_properties(body, 3, name)
        _end(body, pos, name)
        return _ACKS[kind](packet_id, body[2], props)
    if kind == CONNACK:
        if n < 2:
            raise ProtocolError(f"CONNACK: {n} bytes; needs at least 2")
        if body[0] & 0xFE:
            raise ProtocolError(f"CONNACK: reserved acknowledge flags set ({body[0]:#x})")
        props = {}
        pos = 2
        if v5:
            props, pos = _decode_properties(body, 2, name)
        _end(body, pos, name)
        return ConnAck(bool(body[0] & 1), body[1], props)
    if kind in (PINGREQ, PINGRESP):
        if n:
            raise ProtocolError(f"{name}: must be empty, has {n} bytes")
        return PingReq() if kind == PINGREQ else PingResp()
    if kind in (DISCONNECT, AUTH):
        if not v5:
            if kind == AUTH:
                raise ProtocolError("AUTH: exists only in MQTT 5")
            if n:
                raise ProtocolError(f"DISCONNECT: must be empty in MQTT 3.1.1, has {n} bytes")
            return Disconnect()
        if n == 0:
            return Disconnect() if kind == DISCONNECT else Auth()
        props = {}
        pos = 1
        if n > 1:
            props, pos = _decode_properties(body, 1, name)
        _end(body, pos, name)
        return Disconnect(body[0], props) if kind == DISCONNECT else Auth(body[0], props)
    if kind in (SUBACK, UNSUBACK, SUBSCRIBE, UNSUBSCRIBE):
        packet_id, pos = _read_u16(body, 0, f"{name} packet id")
        if packet_id == 0:
            raise ProtocolError(f"{name}: packet id 0 is not allowed")
        props = {}
        if v5:
            props, pos = _decode_properties(body, pos, name)
        if kind == SUBACK:
            if pos >= n:
                raise ProtocolError("SUBACK: no reason codes")
            return SubAck(packet_id, list(body[pos:]), props)
        if kind == UNSUBACK:
            if not v5:
                _end(body, pos, name)
            return UnsubAck(packet_id, list(body[pos:]) if v5 else [], props)
        if pos >= n:
            raise ProtocolError(f"{name}: no topic filters")
        if kind == UNSUBSCRIBE:
            filters = []
            while pos < n:
                topic_filter, pos = _read_str(body, pos, f"{name} topic filter")
                filters.append(topic_filter)
            return Unsubscribe(packet_id, filters, props)
        subscriptions = []
        while pos < n:
            topic_filter, pos = _read_str(body, pos, f"{name} topic filter")
            if pos >= n:
                raise ProtocolError(f"{name}: topic filter {topic_filter!r} has no options byte")
            options = body[pos]
            pos += 1
            if options & (0xC0 if v5 else 0xFC) or options & 0x03 == 3:
                raise ProtocolError(f"{name}: invalid options {options:#x} for {topic_filter!r}")
            subscriptions.append((topic_filter, options))
        return Subscribe(packet_id, subscriptions, props)
    return _decode_connect(flags, body)


def _end(body: bytes, pos: int, name: str) -> None:
    if pos != len(body):
        raise ProtocolError(f"{name}: {len(body) - pos} unexpected bytes after the packet's fields")


def _decode_publish(flags: int, body: bytes, v5: bool) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH: QoS 3 is not a QoS")
    n = len(body)
    if n < 2:
        raise ProtocolError(f"PUBLISH: {n} bytes; needs at least a 2-byte topic length")
    end = 2 + ((body[0] << 8) | body[1])
    if end > n:
        raise ProtocolError("PUBLISH topic: length runs past the end of the packet")
    try:
        topic = body[2:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"PUBLISH topic: not valid UTF-8 ({exc.reason})") from None
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ProtocolError(f"PUBLISH topic {topic!r}: wildcards and U+0000 are not allowed")
    packet_id = 0
    pos = end
    if qos:
        if pos + 2 > n:
            raise ProtocolError("PUBLISH: truncated packet id")
        packet_id = (body[pos] << 8) | body[pos + 1]
        if packet_id == 0:
            raise ProtocolError("PUBLISH: packet id 0 is not allowed for QoS > 0")
        pos += 2
    elif flags & 0x08:
        raise ProtocolError("PUBLISH: DUP set on a QoS 0 message")
    props: Properties = {}
    if v5:
        if pos < n and body[pos] == 0:
            pos += 1
        else:
            props, pos = _decode_properties(body, pos, "PUBLISH")
    return Publish(topic, body[pos:], qos, bool(flags & 1), bool(flags & 0x08), packet_id, props)


def _decode_connect(flags: int, body: bytes) -> Connect:
    name, pos = _read_str(body, 0, "CONNECT protocol name")
    if name != "MQTT":
        raise ProtocolError(f"CONNECT: protocol name {name!r}, expected 'MQTT'")
    if pos + 4 > len(body):
        raise ProtocolError("CONNECT: truncated variable header")
    level, cflags = body[pos], body[pos + 1]
    if level not in (V311, V5):
        raise ProtocolError(f"CONNECT: protocol level {level}, expected 4 or 5")
    if cflags & 0x01:
        raise ProtocolError("CONNECT: reserved flag set")
    keepalive = (body[pos + 2] << 8) | body[pos + 3]
    pos += 4
    v5 = level == V5
    props: Properties = {}
    if v5:
        props, pos = _decode_properties(body, pos, "CONNECT")
    client_id, pos = _read_str(body, pos, "CONNECT client id")
    will = None
    will_qos = (cflags >> 3) & 0x03
    if cflags & 0x04:
        if will_qos == 3:
            raise ProtocolError("CONNECT: will QoS 3")
        will_props: Properties = {}
        if v5:
            will_props, pos = _decode_properties(body, pos, "CONNECT will")
        will_topic, pos = _read_str(body, pos, "CONNECT will topic")
        will_payload, pos = _read_bin(body, pos, "CONNECT will payload")
        will = Will(will_topic, will_payload, will_qos, bool(cflags & 0x20), will_props)
    elif will_qos or cflags & 0x20:
        raise ProtocolError("CONNECT: will QoS/retain set without the will flag")
    username = password = None
    if cflags & 0x80:
        username, pos = _read_str(body, pos, "CONNECT username")
    if cflags & 0x40:
        password, pos = _read_bin(body, pos, "CONNECT password")
    _end(body, pos, "CONNECT")
    packet = Connect(client_id, bool(cflags & 0x02), keepalive, username, password, will, props)
    return packet


class StreamDecoder:
    """Splits a byte stream into packets: `feed(data)` returns the packets completed by
    `data` (none while a packet is still partial). `max_packet_size` bounds what one packet
    may claim (a broker's garbage must not make us buffer 256 MB)."""

    __slots__ = ("_buffer", "max_packet_size", "version")

    def __init__(self, version: int = V311, *, max_packet_size: int = MAX_REMAINING_LENGTH + 5):
        self._buffer = b""
        self.version = version
        self.max_packet_size = max_packet_size

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes, limit: int = 0) -> list[Packet]:
        """The packets `data` completes; with `limit` > 0 at most that many (the rest stay
        buffered for the next call, which may pass b"")."""
        buffer = self._buffer + data if self._buffer else bytes(data)
        packets: list[Packet] = []
        pos = 0
        n = len(buffer)
        version = self.version
        try:
            while n - pos >= 2:
                first = buffer[pos]
                byte = buffer[pos + 1]
                if byte < 0x80:  # the common case: remaining length < 128
                    length = byte
                    start = pos + 2
                else:
                    length = 0
                    shift = 0
                    i = pos + 1
                    while True:
                        if i >= n:
                            length = -1
                            break
                        byte = buffer[i]
                        length |= (byte & 0x7F) << shift
                        i += 1
                        if not byte & 0x80:
                            break
                        shift += 7
                        if shift >= 28:
                            raise ProtocolError(
                                "remaining length: variable byte integer longer than 4 bytes"
                            )
                    if length < 0:
                        break  # the length itself is not complete yet
                    start = i
                if start - pos + length > self.max_packet_size:
                    raise ProtocolError(
                        f"{PACKET_NAMES.get(first >> 4, 'packet')}: {length + start - pos} "
                        f"bytes exceeds the maximum packet size {self.max_packet_size}"
                    )
                end = start + length
                if end > n:
                    break
                packets.append(decode_packet(first, buffer[start:end], version))
                pos = end
                if len(packets) == limit:
                    break
        except ProtocolError:
            self._buffer = b""
            raise
        self._buffer = buffer[pos:] if pos < n else b""
        return packets
