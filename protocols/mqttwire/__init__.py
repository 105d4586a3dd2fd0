"""A lean sans-I/O MQTT 3.1.1 / 5 client: bytes in, events out (like h11 / h2).

* `codec` encodes and decodes packets (remaining-length varint, MQTT 5 properties) and
  splits a byte stream into packets (`StreamDecoder`); malformed input raises
  `ProtocolError` naming the packet and the field.
* `connection.ClientConnection` is the client's state machine: CONNECT/CONNACK,
  SUBSCRIBE/SUBACK, PUBLISH QoS 0/1 both ways, PUBACK, PINGREQ/PINGRESP, DISCONNECT, packet
  ids, the in-flight window, and the resend (DUP) of unacked publishes after a reconnect that
  resumed the session. Its methods queue bytes; `data_to_send()` takes them (one write per
  loop iteration for the transport).
* `aio.MqttClient` is the only I/O: an `asyncio.Protocol` transport on top (TCP or TLS,
  keepalive pings, manual acks, reconnect with session resume).

`codec` and `connection` never import asyncio, socket, ssl, paho, aiomqtt or anything of
gatewayd: they are pure functions of their input. `aio` imports asyncio and ssl, never paho,
aiomqtt or gatewayd.
"""

from protocols.mqttwire.codec import ProtocolError
from protocols.mqttwire.connection import ClientConnection, ConnectOptions

__all__ = ["ClientConnection", "ConnectOptions", "ProtocolError"]
