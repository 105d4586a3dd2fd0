"""The MQTT codec: every packet round-trips (3.1.1 and 5), and any byte stream, cut anywhere,
either decodes or raises `ProtocolError` (never another exception)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.mqttwire import codec
from protocols.mqttwire.codec import ProtocolError, StreamDecoder, decode_packet, encode

text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
topic = text.filter(lambda t: "+" not in t and "#" not in t)
u16 = st.integers(0, 0xFFFF)
packet_id = st.integers(1, 0xFFFF)
blob = st.binary(max_size=300)


@st.composite
def properties(draw: Any) -> dict[str, Any]:
    """Any set of MQTT 5 properties (the codec does not check which packet may carry which)."""
    out: dict[str, Any] = {}
    for name in sorted(draw(st.sets(st.sampled_from(sorted(codec.PROPERTY_NAMES)), max_size=4))):
        _, kind = codec._PROPERTY_IDS[name]
        value: st.SearchStrategy[Any] = {
            "b": st.integers(0, 255),
            "h": u16,
            "i": st.integers(0, 2**32 - 1),
            "v": st.integers(0, codec.MAX_REMAINING_LENGTH),
            "s": text,
            "d": st.binary(max_size=20),
            "p": st.tuples(text, text),
        }[kind]
        if name in codec.REPEATABLE:
            out[name] = draw(st.lists(value, min_size=1, max_size=3))
        else:
            out[name] = draw(value)
    return out


def packets(version: int) -> st.SearchStrategy[codec.Packet]:
    v5 = version == codec.V5
    props = properties() if v5 else st.just({})
    reason = st.integers(0, 255) if v5 else st.just(0)
    will = st.builds(
        codec.Will, topic, st.binary(max_size=30), st.integers(0, 2), st.booleans(), props
    )
    acks = [
        st.builds(cls, packet_id, reason, props)
        for cls in (codec.PubAck, codec.PubRec, codec.PubRel, codec.PubComp)
    ]
    options = st.integers(0, 2) | (
        st.integers(0, 0x3F).filter(lambda o: o & 3 != 3) if v5 else st.nothing()
    )
    return st.one_of(
        st.builds(
            codec.Connect,
            text,
            st.booleans(),
            u16,
            st.none() | text,
            st.none() | st.binary(max_size=20),
            st.none() | will,
            props,
        ).filter(lambda c: v5 or c.password is None or c.username is not None),
        st.builds(codec.ConnAck, st.booleans(), st.integers(0, 255), props),
        st.builds(
            codec.Publish, topic, blob, st.just(0), st.booleans(), st.just(False), st.just(0), props
        ),
        st.builds(
            codec.Publish,
            topic,
            blob,
            st.integers(1, 2),
            st.booleans(),
            st.booleans(),
            packet_id,
            props,
        ),
        *acks,
        st.builds(
            codec.Subscribe,
            packet_id,
            st.lists(st.tuples(text, options), min_size=1, max_size=4),
            props,
        ),
        st.builds(
            codec.SubAck, packet_id, st.lists(st.integers(0, 255), min_size=1, max_size=4), props
        ),
        st.builds(codec.Unsubscribe, packet_id, st.lists(text, min_size=1, max_size=4), props),
        st.builds(
            codec.UnsubAck,
            packet_id,
            st.lists(st.integers(0, 255), max_size=4) if v5 else st.just([]),
            props,
        ),
        st.builds(codec.PingReq),
        st.builds(codec.PingResp),
        st.builds(codec.Disconnect, reason, props),
        *([st.builds(codec.Auth, reason, props)] if v5 else []),
    )


def _normalised(packet: codec.Packet) -> codec.Packet:
    """What a decode gives back: bytes payloads (the codec copies nothing else)."""
    if isinstance(packet, codec.Publish):
        packet.payload = bytes(packet.payload)
    return packet


@pytest.mark.parametrize("version", [codec.V311, codec.V5])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_packet_round_trips(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    raw = encode(packet, version)
    (decoded,) = StreamDecoder(version).feed(raw)
    assert _normalised(decoded) == packet


@pytest.mark.parametrize("version", [codec.V311, codec.V5])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_stream_cut_at_any_points_gives_the_same_packets(
    version: int, data: st.DataObject
) -> None:
    sent = data.draw(st.lists(packets(version), min_size=1, max_size=6))
    stream = b"".join(encode(p, version) for p in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = StreamDecoder(version)
    received: list[codec.Packet] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        received += decoder.feed(stream[start:end])
    assert received == sent
    assert decoder.buffered == 0


@pytest.mark.parametrize("version", [codec.V311, codec.V5])
@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_arbitrary_bytes_cut_anywhere_decode_or_raise_protocol_error(
    version: int, stream: bytes, cuts: list[int]
) -> None:
    decoder = StreamDecoder(version, max_packet_size=1000)
    bounds = sorted(min(c, len(stream)) for c in cuts)
    try:
        for start, end in zip([0, *bounds], [*bounds, len(stream)], strict=True):
            decoder.feed(stream[start:end])
    except ProtocolError as exc:
        assert str(exc)  # says what is wrong


@pytest.mark.parametrize("version", [codec.V311, codec.V5])
@settings(max_examples=200, deadline=None)
@given(first=st.integers(0, 255), body=st.binary(max_size=64))
def test_any_packet_body_decodes_or_raises_protocol_error(
    version: int, first: int, body: bytes
) -> None:
    try:
        packet = decode_packet(first, body, version)
    except ProtocolError:
        return
    # what decodes also encodes (the codec never accepts what it cannot write back)
    encode(packet, version)


@given(st.integers(0, codec.MAX_REMAINING_LENGTH))
def test_varint_round_trips(value: int) -> None:
    raw = codec.encode_varint(value)
    assert len(raw) == 1 + (value >= 128) + (value >= 16_384) + (value >= 2_097_152)
    assert codec._decode_varint(raw, 0, "x") == (value, len(raw))


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
        (b"\x00\x00", "packet type 0 is reserved"),
        (b"\x36\x03\x00\x01a", "QoS 3"),
        (b"\x82\x05\x00\x01\x00\x01a", "no options byte"),
        (b"\x40\x03\x00\x01\x00", "MQTT 3.1.1 allows exactly 2"),
        (b"\x32\x05\x00\x01a\x00\x00", "packet id 0"),
        (b"\x30\x04\x00\x02\xc3\x28", "not valid UTF-8"),
        (b"\x30\x03\x00\x01#", "wildcards"),
        (b"\xc1\x00", "PINGREQ: fixed-header flags"),
    ],
)
def test_malformed_input_names_the_packet_and_the_problem(stream: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        StreamDecoder(codec.V311).feed(stream)


def test_a_packet_over_the_maximum_size_is_refused_before_it_is_buffered() -> None:
    decoder = StreamDecoder(codec.V311, max_packet_size=100)
    with pytest.raises(
        ProtocolError, match="PUBLISH: 1003 bytes exceeds the maximum packet size 100"
    ):
        decoder.feed(b"\x30\xe8\x07")  # claims 1000 bytes; none of them sent yet


def test_what_cannot_be_encoded_is_refused_clearly() -> None:
    with pytest.raises(ProtocolError, match="QoS must be 0, 1 or 2"):
        encode(codec.Publish("a", b"", qos=3, packet_id=1))
    with pytest.raises(ProtocolError, match=r"packet id must be 1\.\.65535"):
        encode(codec.Publish("a", b"", qos=1, packet_id=0))
    with pytest.raises(ProtocolError, match="topic is 70000 bytes"):
        encode(codec.Publish("a" * 70_000, b""))
    with pytest.raises(ProtocolError, match="unknown MQTT 5 property 'colour'"):
        encode(codec.Disconnect(0, {"colour": 1}), codec.V5)


def test_mqtt5_publish_properties_and_the_plain_puback_are_byte_exact() -> None:
    raw = encode(
        codec.Publish("t", b"x", 1, packet_id=2, properties={"message_expiry_interval": 5}), 5
    )
    assert raw == b"\x32\x0c\x00\x01t\x00\x02\x05\x02\x00\x00\x00\x05x"
    assert codec.encode_puback(0x1234) == encode(codec.PubAck(0x1234)) == b"\x40\x02\x12\x34"
