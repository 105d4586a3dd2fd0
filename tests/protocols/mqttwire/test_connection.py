"""The client state machine, driven with the bytes a broker would send (built with the codec)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.mqttwire import codec
from protocols.mqttwire.codec import ProtocolError, StreamDecoder, encode
from protocols.mqttwire.connection import ClientConnection, ConnectOptions, State
from tests.protocols.mqttwire.test_codec import packets


def _sent(conn: ClientConnection, version: int = codec.V311) -> list[codec.Packet]:
    return StreamDecoder(version).feed(conn.data_to_send())


def _connected(**kw: object) -> ClientConnection:
    conn = ClientConnection(ConnectOptions("c1", **kw))  # type: ignore[arg-type]
    conn.connect()
    (connect,) = _sent(conn)
    assert isinstance(connect, codec.Connect) and connect.client_id == "c1"
    (connack,) = conn.receive_data(encode(codec.ConnAck()))
    assert isinstance(connack, codec.ConnAck) and conn.state is State.CONNECTED
    return conn


def test_qos1_publishes_wait_for_the_window_and_are_resent_with_dup_after_a_reconnect():
    conn = _connected(clean_start=False, max_inflight=2)
    ids = [conn.publish(f"t/{n}", b"%d" % n, qos=1) for n in range(3)]
    first = _sent(conn)
    assert [(p.topic, p.packet_id, p.dup) for p in first] == [
        ("t/0", ids[0], False),
        ("t/1", ids[1], False),
    ]
    assert conn.receive_data(encode(codec.PubAck(ids[0]))) == [codec.PubAck(ids[0])]
    (third,) = _sent(conn)  # the PUBACK freed a slot
    assert (third.topic, third.dup) == ("t/2", False)
    conn.connection_lost()
    assert conn.state is State.DISCONNECTED and conn.inflight == 2
    conn.connect()
    assert isinstance(_sent(conn)[0], codec.Connect)
    conn.receive_data(encode(codec.ConnAck(session_present=True)))
    resent = _sent(conn)
    assert [(p.topic, p.packet_id, p.dup, p.qos) for p in resent] == [
        ("t/1", ids[1], True, 1),
        ("t/2", ids[2], True, 1),
    ]


def test_a_publish_made_while_disconnected_goes_out_after_the_connack_without_dup():
    conn = ClientConnection(ConnectOptions("c1"))
    packet_id = conn.publish("t", b"x", qos=1)
    with pytest.raises(ProtocolError, match="QoS 0 publish without a connection"):
        conn.publish("t", b"x", qos=0)
    conn.connect()
    conn.receive_data(encode(codec.ConnAck()))
    (connect, publish) = _sent(conn)
    assert isinstance(connect, codec.Connect)
    assert (publish.packet_id, publish.dup) == (packet_id, False)


def test_received_qos1_messages_are_acked_once_and_only_on_their_own_connection():
    conn = _connected()
    (message,) = conn.receive_data(encode(codec.Publish("d/1", b"hi", qos=1, packet_id=7)))
    assert isinstance(message, codec.Publish) and message.payload == b"hi"
    assert conn.data_to_send() == b""  # nothing acked on arrival
    assert conn.ack(7) and not conn.ack(7)
    assert _sent(conn) == [codec.PubAck(7)]
    conn.receive_data(encode(codec.Publish("d/1", b"again", qos=1, packet_id=8)))
    conn.connection_lost()
    conn.connect()
    conn.receive_data(encode(codec.ConnAck(session_present=True)))
    assert not conn.ack(8)  # received on the lost connection: the broker redelivers it


def test_mqtt5_receive_maximum_bounds_the_window_and_topic_aliases_resolve():
    conn = ClientConnection(
        ConnectOptions("c5", version=5, properties={"session_expiry_interval": 60})
    )
    conn.connect()
    (connect,) = _sent(conn, 5)
    assert connect.properties == {"session_expiry_interval": 60}
    conn.receive_data(
        encode(codec.ConnAck(properties={"receive_maximum": 1, "server_keep_alive": 5}), 5)
    )
    assert conn.keepalive == 5
    conn.publish("a", b"", qos=1)
    conn.publish("b", b"", qos=1)
    assert [p.topic for p in _sent(conn, 5)] == ["a"]
    set_alias = codec.Publish("long/topic", b"1", properties={"topic_alias": 3})
    use_alias = codec.Publish("", b"2", properties={"topic_alias": 3})
    events = conn.receive_data(encode(set_alias, 5) + encode(use_alias, 5))
    assert [e.topic for e in events if isinstance(e, codec.Publish)] == ["long/topic", "long/topic"]
    with pytest.raises(ProtocolError, match="topic alias 9 used before it was set"):
        conn.receive_data(encode(codec.Publish("", b"", properties={"topic_alias": 9}), 5))


def test_protocol_violations_by_the_broker_raise():
    conn = ClientConnection(ConnectOptions("c1"))
    conn.connect()
    with pytest.raises(ProtocolError, match="expected CONNACK first, got PUBLISH"):
        conn.receive_data(encode(codec.Publish("t", b"")))
    conn = _connected()
    with pytest.raises(ProtocolError, match="must not send SUBSCRIBE"):
        conn.receive_data(encode(codec.Subscribe(1, [("t", 1)])))


def test_a_refused_connack_disconnects_and_the_pingreq_counts():
    conn = ClientConnection(ConnectOptions("c1"))
    conn.connect()
    (connack,) = conn.receive_data(encode(codec.ConnAck(reason_code=5)))
    assert connack.reason_code == 5 and conn.state is State.DISCONNECTED
    conn = _connected()
    conn.ping()
    assert conn.pings_outstanding == 1 and _sent(conn) == [codec.PingReq()]
    conn.receive_data(b"\xd0\x00")
    assert conn.pings_outstanding == 0


def test_packet_ids_skip_those_in_use_and_wrap():
    conn = _connected()
    conn._next_id = 0xFFFF
    a = conn.publish("t", b"", qos=1)
    b = conn.publish("t", b"", qos=1)
    assert (a, b) == (0xFFFF, 1)
    conn._next_id = 0xFFFF
    assert conn.subscribe([("x", 1)]) == 2


@pytest.mark.parametrize("version", [codec.V311, codec.V5])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_any_bytes_from_the_broker_give_events_or_a_protocol_error(
    version: int, data: st.DataObject
) -> None:
    """Valid packets of every kind, with garbage between them, cut anywhere."""
    chunks = data.draw(
        st.lists(
            packets(version).map(lambda p: encode(p, version)) | st.binary(max_size=8), max_size=5
        )
    )
    stream = b"".join(chunks)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=5))
    conn = ClientConnection(ConnectOptions("c", version=version))
    conn.connect()
    conn.receive_data(encode(codec.ConnAck(), version))
    conn.publish("t", b"x", qos=1)
    bounds = sorted(cuts)
    try:
        for start, end in zip([0, *bounds], [*bounds, len(stream)], strict=True):
            if conn.state is State.DISCONNECTED:
                break  # the broker's DISCONNECT ended it
            for event in conn.receive_data(stream[start:end]):
                if isinstance(event, codec.Publish) and event.qos == 1:
                    conn.ack(event.packet_id)
    except ProtocolError as exc:
        assert str(exc)
    conn.data_to_send()
