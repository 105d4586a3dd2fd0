"""The client side of one MQTT session, sans I/O: methods queue bytes, `receive_data` turns
the broker's bytes into events, `data_to_send()` takes what is queued.

Events are the decoded packets themselves: `ConnAck` (check `reason_code`), `Publish` (a
message; QoS 1 ones wait for `ack(packet_id)`), `PubAck` (a publish of ours is done),
`SubAck`, `UnsubAck`, `PingResp` and, in MQTT 5, `Disconnect` from the broker.

The session outlives connections: QoS 1 publishes not yet acknowledged stay in flight across
`connection_lost()` and are sent again, with DUP set, after the next `connect()`'s CONNACK (in
their original order, within the in-flight window). Messages received on a lost connection
can no longer be acked (`ack` answers False): the broker redelivers them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from protocols.mqttwire.codec import (
    V5,
    V311,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingResp,
    Properties,
    ProtocolError,
    PubAck,
    Publish,
    StreamDecoder,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
    encode_puback,
    encode_publish,
)

__all__ = ["ClientConnection", "ConnectOptions", "State"]


class State(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"  # CONNECT sent, no CONNACK yet
    CONNECTED = "connected"


@dataclass(slots=True)
class ConnectOptions:
    """What CONNECT says. `version` 4 is MQTT 3.1.1, 5 is MQTT 5. `clean_start` False keeps
    the session (3.1.1: clean session 0; MQTT 5: set `session_expiry_interval` in
    `properties` too, or the session ends with the connection). `max_inflight` bounds our
    unacknowledged QoS 1 publishes (MQTT 5: also the broker's Receive Maximum)."""

    client_id: str
    version: int = V311
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)
    max_inflight: int = 65_535
    max_packet_size: int = 268_435_460

    def __post_init__(self) -> None:
        if self.version not in (V311, V5):
            raise ValueError(f"MQTT version must be 4 (3.1.1) or 5, got {self.version!r}")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.properties and self.version != V5:
            raise ValueError("CONNECT properties exist only in MQTT 5 (version=5)")


class _Outgoing:
    """A QoS 1 publish of ours until its PUBACK."""

    __slots__ = ("payload", "properties", "retain", "sent", "topic")

    def __init__(
        self, topic: str, payload: bytes, retain: bool, properties: Properties | None
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.properties = properties
        self.sent = False  # sent at least once: a resend carries DUP


class ClientConnection:
    """One client session's protocol state; see the module docstring."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self.version = options.version
        self.state = State.DISCONNECTED
        self.keepalive = options.keepalive  # MQTT 5: the broker may override it in CONNACK
        self.session_present = False
        self.connack_properties: Properties = {}
        self.connections = 0  # increments at each connect(): a message's `generation`
        self._out: list[bytes] = []
        self._decoder = StreamDecoder(options.version, max_packet_size=options.max_packet_size)
        self._next_id = 1
        self._inflight: dict[int, _Outgoing] = {}  # our QoS 1 publishes, in publish order
        self._unsent: deque[int] = deque()  # of those, not (re)sent on this connection yet
        self._in_window = 0  # sent on this connection, not yet acknowledged
        self._window = options.max_inflight
        self._requests: set[int] = set()  # SUBSCRIBE/UNSUBSCRIBE ids awaiting their ack
        self._unacked: set[int] = set()  # received QoS 1 packet ids not yet acked
        self._aliases: dict[int, str] = {}  # MQTT 5 inbound topic aliases
        self.pings_outstanding = 0

    # ------------------------------------------------------------------ outgoing

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one bytes object."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def connect(self) -> None:
        """Queue CONNECT (the first thing on every new connection)."""
        if self.state is not State.DISCONNECTED:
            raise ProtocolError(f"connect() while {self.state.value}: call connection_lost()")
        o = self.options
        self._decoder = StreamDecoder(o.version, max_packet_size=o.max_packet_size)
        self._out.clear()
        self.connections += 1
        self.state = State.CONNECTING
        self.pings_outstanding = 0
        packet = Connect(
            o.client_id, o.clean_start, o.keepalive, o.username, o.password, o.will, o.properties
        )
        self._out.append(encode(packet, o.version))

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> int:
        """Queue a PUBLISH; returns its packet id (0 for QoS 0). A QoS 1 publish is kept until
        its PUBACK and sent once connected and within the in-flight window; QoS 0 needs a
        connection (raises `ProtocolError` without one)."""
        if qos == 0:
            if self.state is not State.CONNECTED:
                raise ProtocolError("QoS 0 publish without a connection: it would be lost")
            self._out.append(
                encode_publish(topic, payload, 0, retain, False, 0, properties, self.version)
            )
            return 0
        if qos != 1:
            raise ProtocolError(f"publish QoS must be 0 or 1, got {qos!r} (QoS 2 unsupported)")
        # encode once now, so that a bad topic fails here and not at the resend
        packet_id = self._allocate_id()
        data = encode_publish(topic, payload, 1, retain, False, packet_id, properties, self.version)
        self._inflight[packet_id] = item = _Outgoing(topic, payload, retain, properties)
        if self.state is State.CONNECTED and self._in_window < self._window and not self._unsent:
            item.sent = True
            self._in_window += 1
            self._out.append(data)
        else:
            self._unsent.append(packet_id)
        return packet_id

    def ack(self, packet_id: int) -> bool:
        """Queue the PUBACK of a QoS 1 message received on this connection; False when there
        is nothing to ack (acked already, or received on a connection since lost)."""
        try:
            self._unacked.remove(packet_id)
        except KeyError:
            return False
        self._out.append(encode_puback(packet_id))
        return True

    def subscribe(
        self, subscriptions: list[tuple[str, int]], properties: Properties | None = None
    ) -> int:
        """Queue SUBSCRIBE for (filter, options) pairs (options: the QoS, plus MQTT 5's
        subscription options bits); returns the packet id its SubAck will carry."""
        self._require_connected("subscribe")
        packet_id = self._allocate_id()
        self._out.append(
            encode(Subscribe(packet_id, list(subscriptions), properties or {}), self.version)
        )
        self._requests.add(packet_id)
        return packet_id

    def unsubscribe(self, filters: list[str], properties: Properties | None = None) -> int:
        self._require_connected("unsubscribe")
        packet_id = self._allocate_id()
        self._out.append(
            encode(Unsubscribe(packet_id, list(filters), properties or {}), self.version)
        )
        self._requests.add(packet_id)
        return packet_id

    def ping(self) -> None:
        """Queue PINGREQ (`pings_outstanding` counts those without a PINGRESP yet)."""
        self._require_connected("ping")
        self.pings_outstanding += 1
        self._out.append(b"\xc0\x00")

    def disconnect(self, reason_code: int = 0, properties: Properties | None = None) -> None:
        """Queue DISCONNECT (MQTT 5: 0x04 asks the broker to publish the will anyway); the
        connection is over once the bytes are out."""
        if self.state is State.DISCONNECTED:
            return
        self._out.append(encode(Disconnect(reason_code, properties or {}), self.version))
        self._lost()

    def connection_lost(self) -> None:
        """The transport is gone: forget this connection's state, keep the session's."""
        if self.state is not State.DISCONNECTED:
            self._lost()
        self._out.clear()

    def _lost(self) -> None:
        self.state = State.DISCONNECTED
        self._unacked.clear()
        self._requests.clear()
        self._aliases.clear()
        self._in_window = 0
        self._unsent = deque(self._inflight)  # everything in flight goes again, in order

    # ------------------------------------------------------------------ incoming

    def receive_data(self, data: bytes, max_packets: int = 0) -> list[Packet]:
        """Feed the broker's bytes; returns the events they completed (see the module
        docstring), at most `max_packets` when > 0: the rest wait, decoded by a later call
        (`receive_data(b"")` once `buffered`). Raises `ProtocolError` for bytes that are not
        MQTT or a packet a broker must not send; the caller should then close the
        connection."""
        if self.state is State.DISCONNECTED:
            raise ProtocolError("data received without a connection (call connect() first)")
        packets = self._decoder.feed(data, max_packets)
        if not packets:
            return packets
        if self.state is State.CONNECTING:
            first = packets[0]
            if not isinstance(first, ConnAck):
                raise ProtocolError(f"expected CONNACK first, got {type(first).__name__.upper()}")
        events: list[Packet] = []
        for packet in packets:
            if isinstance(packet, Publish):
                if packet.qos == 1:
                    self._unacked.add(packet.packet_id)
                elif packet.qos == 2:
                    raise ProtocolError(
                        f"PUBLISH QoS 2 on {packet.topic!r}: this client subscribes at QoS <= 1"
                    )
                if self.version == V5 and "topic_alias" in packet.properties:
                    self._resolve_alias(packet)
                events.append(packet)
            elif isinstance(packet, PubAck):
                if self._inflight.pop(packet.packet_id, None) is not None:
                    self._in_window -= 1
                    if self._unsent:
                        self._send_unsent()
                events.append(packet)
            elif isinstance(packet, SubAck | UnsubAck):
                self._requests.discard(packet.packet_id)
                events.append(packet)
            elif isinstance(packet, PingResp):
                self.pings_outstanding = 0
                events.append(packet)
            elif isinstance(packet, ConnAck):
                if self.state is not State.CONNECTING:
                    raise ProtocolError("a second CONNACK on one connection")
                self._on_connack(packet)
                events.append(packet)
                if self.state is State.DISCONNECTED:
                    break  # refused: the broker closes the connection
            elif isinstance(packet, Disconnect):
                self._lost()
                events.append(packet)
                break
            else:
                raise ProtocolError(
                    f"a broker must not send {type(packet).__name__.upper()} to a client"
                )
        return events

    def _on_connack(self, packet: ConnAck) -> None:
        if packet.reason_code:
            self._lost()
            return
        self.state = State.CONNECTED
        self.session_present = packet.session_present
        self.connack_properties = packet.properties
        self._window = self.options.max_inflight
        if self.version == V5:
            self._window = min(self._window, packet.properties.get("receive_maximum", 65_535))
            self.keepalive = packet.properties.get("server_keep_alive", self.options.keepalive)
        self._send_unsent()

    def _send_unsent(self) -> None:
        unsent = self._unsent
        while unsent and self._in_window < self._window:
            packet_id = unsent.popleft()
            item = self._inflight.get(packet_id)
            if item is None:
                continue
            self._out.append(
                encode_publish(
                    item.topic,
                    item.payload,
                    1,
                    item.retain,
                    item.sent,
                    packet_id,
                    item.properties,
                    self.version,
                )
            )
            item.sent = True
            self._in_window += 1

    def _resolve_alias(self, packet: Publish) -> None:
        alias = packet.properties["topic_alias"]
        if packet.topic:
            self._aliases[alias] = packet.topic
            return
        topic = self._aliases.get(alias)
        if topic is None:
            raise ProtocolError(f"PUBLISH: topic alias {alias} used before it was set")
        packet.topic = topic

    # ------------------------------------------------------------------ state

    @property
    def buffered(self) -> int:
        """Received bytes not decoded yet (a partial packet, or packets past `max_packets`)."""
        return self._decoder.buffered

    @property
    def inflight(self) -> int:
        """Our QoS 1 publishes not yet acknowledged (sent or waiting for the window)."""
        return len(self._inflight)

    @property
    def inflight_ids(self) -> list[int]:
        return list(self._inflight)

    @property
    def unacked_received(self) -> int:
        return len(self._unacked)

    def forget(self, packet_id: int) -> bool:
        """Stop resending a QoS 1 publish (the app gave up on it); True if it was in flight.
        A sent one frees its window slot (a late PUBACK for it is ignored)."""
        item = self._inflight.pop(packet_id, None)
        if item is None:
            return False
        if item.sent and self.state is State.CONNECTED:
            self._in_window -= 1
        return True

    def _require_connected(self, what: str) -> None:
        if self.state is not State.CONNECTED:
            raise ProtocolError(f"{what}() needs a connection (state: {self.state.value})")

    def _allocate_id(self) -> int:
        busy_inflight = self._inflight
        busy_requests = self._requests
        if len(busy_inflight) + len(busy_requests) >= 0xFFFF:
            raise ProtocolError("all 65535 packet ids are in use")
        packet_id = self._next_id
        while packet_id in busy_inflight or packet_id in busy_requests:
            packet_id = packet_id % 0xFFFF + 1
        self._next_id = packet_id % 0xFFFF + 1
        return packet_id
