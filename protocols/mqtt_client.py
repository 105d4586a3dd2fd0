"""An aiomqtt client with manual acks and socket-level flow control, for the MQTT bridge.

aiomqtt 2.x acknowledges QoS 1 messages on arrival, cannot pause reading, and has no public
"disconnected" awaitable. `ManualAckClient` adds the three, and is the only module that
reaches into aiomqtt/paho internals (`_client`, `_loop`, `_queue`, `_disconnected`), so an
aiomqtt upgrade (pinned `>=2.5,<3`) is checked here; the bridge tests exercise every path
against a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocols.mqtt_settings import BrokerAddress, MqttSettings
from protocols.mqttwire import aio as native
from protocols.mqttwire.codec import Publish

# What a lost, refused or timed-out broker connection raises, for either client.
CLIENT_ERRORS: tuple[type[Exception], ...] = (aiomqtt.MqttError, native.MqttError)

# Small PUBACKs and replies must not wait for Nagle + delayed ACK (~40 ms each).
TCP_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

# paho's `_packet_write` acts on a written packet only for a QoS 0 PUBLISH (on_publish) and a
# DISCONNECT (closes the socket); every other packet can share one send() with its neighbours.
_SIDE_EFFECT_FREE = paho.PUBACK


def coalesce_out_packets(out_packets: deque[Any]) -> None:
    """Merge runs of queued, not yet started paho packets without a write side effect into
    one packet each, preserving order, so paho sends them with one send() call."""
    if len(out_packets) < 2:
        return
    merged: deque[Any] = deque()
    run: list[Any] = []

    def close_run() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            data = b"".join(bytes(packet["packet"]) for packet in run)
            merged.append(
                {
                    "command": _SIDE_EFFECT_FREE,
                    "mid": 0,
                    "qos": 1,
                    "pos": 0,
                    "to_process": len(data),
                    "packet": data,
                    "info": None,
                }
            )
        run.clear()

    for packet in out_packets:
        command = packet["command"] & 0xF0
        plain = (
            packet["pos"] == 0
            and command != paho.DISCONNECT
            and not (command == paho.PUBLISH and packet["qos"] == 0)
        )
        if plain:
            run.append(packet)
        else:
            close_run()
            merged.append(packet)
    close_run()
    if len(merged) != len(out_packets):
        out_packets.clear()
        out_packets.extend(merged)


class IncomingStats(Protocol):
    high_water: int
    peak: int

    def qsize(self) -> int: ...


class BridgeClient(Protocol):
    """What the MQTT bridge needs of a broker connection: `ManualAckClient` (paho via
    aiomqtt) and `protocols.mqttwire.aio.MqttClient` (the native codec) both are one. Their
    errors for a lost or refused connection are `CLIENT_ERRORS`."""

    @property
    def incoming(self) -> IncomingStats: ...

    @property
    def disconnected(self) -> asyncio.Future[None]: ...

    @property
    def reading_paused(self) -> bool: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc_info: Any) -> Any: ...

    async def receive(self) -> Publish: ...

    def resume_reading(self) -> None: ...

    def ack(self, mid: int, qos: int) -> bool: ...

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int
    ) -> tuple[int, asyncio.Future[Any]]: ...

    def forget_publish(self, mid: int) -> None: ...

    async def subscribe(
        self, topic: str, /, qos: int = 0, *, timeout: float | None = None
    ) -> Any: ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        /,
        qos: int = 0,
        retain: bool = False,
        *,
        timeout: float | None = None,
    ) -> Any: ...


class IncomingQueue(asyncio.Queue):  # type: ignore[type-arg]
    """The client's queue of received messages. It never drops (aiomqtt drops when a bounded
    queue is full); it calls `on_high_water` once it holds `high_water` messages."""

    def __init__(self, maxsize: int = 0, *, high_water: int) -> None:
        super().__init__(maxsize=0)
        self.high_water = high_water
        self.peak = 0
        self.on_high_water: Callable[[], None] | None = None

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        size = self.qsize()
        self.peak = max(self.peak, size)
        if size >= self.high_water and self.on_high_water is not None:
            self.on_high_water()


class ManualAckClient(aiomqtt.Client):
    """`aiomqtt.Client` that acks only when told (`ack`) and stops reading the socket while
    `incoming` holds `high_water` messages, until `resume_reading()`.

    Manual acks are switched on in the constructor, i.e. before CONNECT: otherwise the messages
    the broker queued for a persistent session are acked the moment they arrive.
    """

    def __init__(
        self,
        hostname: str,
        port: int,
        *,
        high_water: int,
        on_pause: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["queue_type"] = functools.partial(IncomingQueue, high_water=high_water)
        kwargs["socket_options"] = (*kwargs.get("socket_options", ()), *TCP_NODELAY)
        super().__init__(hostname, port, **kwargs)
        self.incoming = cast(IncomingQueue, self._queue)
        self.incoming.on_high_water = self.pause_reading
        self._on_pause = on_pause
        self._paused_socket: Any = None
        self._loop_thread_id = threading.get_ident()
        self._write_scheduled = False
        self._acked: dict[int, asyncio.Future[None]] = {}  # publish_nowait's, by packet id
        self._client.manual_ack_set(True)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """Completes (with the reason as exception) once the connection is lost."""
        return self._disconnected

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
        properties: Any = None,
    ) -> None:  # fmt: skip
        """A connection lost before the broker's CONNACK fails the connect at once. aiomqtt
        ignores it and lets `__aenter__` wait out its whole timeout (`connect_timeout_s`, 10 s
        by default): a broker restarting while the replies' connection was connecting held
        every reply back that long. The bridge reconnects with its usual backoff."""
        if self._connected.done():
            super()._on_disconnect(client, userdata, flags, reason_code, properties)
            return
        lost = aiomqtt.MqttError(f"connection lost before the broker's CONNACK ({reason_code})")
        if threading.get_ident() == self._loop_thread_id:
            self._fail_connect(lost)
        else:  # paho's connect() runs in an executor thread
            self._loop.call_soon_threadsafe(self._fail_connect, lost)

    def _fail_connect(self, lost: aiomqtt.MqttError) -> None:
        if not self._connected.done():
            self._connected.set_exception(lost)

    async def receive(self) -> Publish:
        """The next message, as the native client gives it (raises `aiomqtt.MqttError` once
        disconnected)."""
        message = await self.messages.__anext__()
        payload = message.payload
        return Publish(
            message.topic.value,
            payload if isinstance(payload, bytes) else bytes(payload),  # type: ignore[arg-type]
            message.qos,
            message.retain,
            False,
            message.mid,
        )

    @property
    def reading_paused(self) -> bool:
        return self._paused_socket is not None

    def ack(self, mid: int, qos: int) -> bool:
        """PUBACK (QoS 1) / PUBCOMP (QoS 2) on this connection; False if it is gone."""
        return self._client.ack(mid, qos) == paho.MQTT_ERR_SUCCESS

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int
    ) -> tuple[int, asyncio.Future[None]]:
        """Queue a PUBLISH; the future completes when it is done (QoS 1: the broker's PUBACK;
        QoS 0: written). aiomqtt's `publish()` costs two tasks, an Event and a timer per
        message; this costs one future. Never completes if the connection is lost: wait on
        `disconnected` too. Raises `aiomqtt.MqttCodeError` if paho refuses the message."""
        info = self._client.publish(topic, payload, qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        done: asyncio.Future[None] = self._loop.create_future()
        if info.is_published():
            done.set_result(None)
        else:
            self._acked[info.mid] = done
        return info.mid, done

    def forget_publish(self, mid: int) -> None:
        """Stop tracking a `publish_nowait` nobody waits for any more (it timed out)."""
        self._acked.pop(mid, None)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        done = self._acked.pop(mid, None)
        if done is None:
            super()._on_publish(client, userdata, mid, reason_code, properties)
        elif not done.done():
            done.set_result(None)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """paho queued packets. aiomqtt arms a writer per burst (via call_soon_threadsafe,
        i.e. a self-pipe write, then add_writer/epoll/remove_writer) and paho sends each packet
        with its own send(); here, on the loop thread, every packet queued during this loop
        iteration (PUBACKs, replies) goes out at its end in as few send() calls as possible."""
        if threading.get_ident() != self._loop_thread_id:
            super()._on_socket_register_write(client, userdata, sock)  # connect() thread
            return
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write_queued)

    def _write_queued(self) -> None:
        self._write_scheduled = False
        client = self._client
        coalesce_out_packets(client._out_packet)
        try:
            client.loop_write()
        except Exception as exc:  # e.g. BrokenPipe: the connection is gone (as aiomqtt does)
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
            return
        sock: Any = client.socket()
        if client.want_write() and sock is not None and sock.fileno() >= 0:
            # The socket buffer is full: finish when writable (paho unregisters, which
            # removes this writer, once everything is written).
            self._loop.add_writer(sock.fileno(), self._write_queued)

    def pause_reading(self) -> None:
        """Stop reading the socket: TCP flow control then pushes back on the broker.

        aiomqtt reads from a `loop.add_reader` callback it does not expose, so pausing removes
        that reader and `resume_reading` installs an equivalent one.
        """
        if self._paused_socket is not None:
            return
        sock: Any = self._client.socket()
        if sock is None or sock.fileno() < 0:
            return
        self._loop.remove_reader(sock.fileno())
        self._paused_socket = sock
        if self._on_pause is not None:
            self._on_pause()

    def resume_reading(self) -> None:
        sock: Any = self._paused_socket
        self._paused_socket = None
        if sock is None:
            return
        fd = sock.fileno()
        if fd < 0 or self._client.socket() is not sock:
            return  # the connection is gone
        self._loop.add_reader(fd, self._read)
        self._loop.call_soon(self._read)  # bytes may already sit decrypted in the TLS buffer

    def _read(self) -> None:
        """As aiomqtt's reader: paho's loop_read, draining TLS-buffered bytes; an error ends
        the connection (seen by everyone awaiting `disconnected`)."""
        if self._paused_socket is not None:
            return
        try:
            while True:
                self._client.loop_read()
                pending = getattr(self._client.socket(), "pending", None)
                if pending is None or pending() == 0 or self._paused_socket is not None:
                    break
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)


def outbound_client(
    settings: MqttSettings,
    address: BrokerAddress,
    ssl_context: ssl.SSLContext | None,
    client_id: str,
) -> ManualAckClient:
    """The bridge's replies' connection on paho: clean session, no will, no subscriptions."""
    s = settings
    v5 = s.protocol == "5"
    client = ManualAckClient(
        address.host,
        address.port,
        high_water=s.max_pending_messages,  # nothing is subscribed: nothing comes in
        username=s.username,
        password=s.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else True,
        clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        keepalive=s.keepalive_s,
        timeout=s.connect_timeout_s,
        max_inflight_messages=s.max_inflight_publishes,
        tls_context=ssl_context if address.tls else None,
        tls_insecure=s.tls_insecure if address.tls else None,
    )
    client.pending_calls_threshold = s.max_inflight_publishes + 8
    return client


def device_client(
    settings: MqttSettings,
    address: BrokerAddress,
    ssl_context: ssl.SSLContext | None,
    *,
    will: tuple[str, bytes] | None,
    on_pause: Callable[[], None],
    subscriptions: int,
) -> ManualAckClient:
    """The bridge's device messages' connection on paho: persistent session (3.1.1
    clean_session=False; 5: clean_start=False with `session_expiry_s`), manual acks, the
    offline will."""
    s = settings
    v5 = s.protocol == "5"
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = s.session_expiry_s
        # Our window: the broker sends at most this many unacked QoS 1 messages.
        properties.ReceiveMaximum = min(65_535, s.max_pending_messages)
    client = ManualAckClient(
        address.host,
        address.port,
        high_water=s.max_pending_messages,
        on_pause=on_pause,
        username=s.username,
        password=s.password,
        identifier=s.client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else False,
        # MQTT 5: never MQTT_CLEAN_START_FIRST_ONLY, it would drop the session on start.
        clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        keepalive=s.keepalive_s,
        will=None if will is None else aiomqtt.Will(will[0], will[1], qos=1, retain=True),
        properties=properties,
        timeout=s.connect_timeout_s,
        max_inflight_messages=s.max_inflight_publishes,
        tls_context=ssl_context if address.tls else None,
        tls_insecure=s.tls_insecure if address.tls else None,
    )
    # Silence aiomqtt's "N pending publish calls" warning: our workers bound them.
    client.pending_calls_threshold = s.max_inflight_publishes + subscriptions + 8
    return client
