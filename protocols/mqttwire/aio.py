"""`MqttClient`: the sans-I/O `ClientConnection` on an `asyncio.Protocol` (TCP or TLS).

    client = MqttClient("127.0.0.1", 1883, ConnectOptions("me", clean_start=False))
    async with client:                       # CONNECT, wait for CONNACK
        await client.subscribe("devices/+/up", qos=1)
        while True:
            message = await client.receive()  # a codec.Publish
            ...                               # commit it somewhere
            client.ack(message.packet_id, message.qos)   # the PUBACK goes out only now

* **Manual acks**: nothing is acknowledged until `ack()`.
* **One write per loop iteration**: PUBACKs and publishes queued during an iteration leave in
  one `transport.write` at its end.
* **Keepalive**: a PINGREQ when nothing was sent for half the keepalive; no PINGRESP (nor
  anything else) within a keepalive after it ends the connection.
* **Flow control**: `pause_reading()` / `resume_reading()`; reading pauses by itself while
  `incoming` holds `high_water` messages (TCP flow control then pushes back on the broker).
* **Reconnect**: `connect()` again after a loss (the object keeps the session): with
  `clean_start=False` (MQTT 5: and a `session_expiry_interval`) the broker resumes the
  session and our unacknowledged QoS 1 publishes are sent again with DUP; their futures
  complete on the PUBACK of the resend.

Errors: `MqttError` (and subclasses) for a lost, refused or timed-out connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from protocols.mqttwire.codec import (
    ConnAck,
    Disconnect,
    Properties,
    ProtocolError,
    PubAck,
    Publish,
    SubAck,
    UnsubAck,
)
from protocols.mqttwire.connection import ClientConnection, ConnectOptions, State

__all__ = ["ConnectRefusedError", "ConnectionLostError", "MqttClient", "MqttError"]

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9F: "connection rate exceeded",
}


class MqttError(Exception):
    """The connection could not be made, was refused, or is gone."""


class ConnectionLostError(MqttError):
    """The connection ended (the cause, if any, is `__cause__`)."""


class ConnectRefusedError(MqttError):
    """The broker's CONNACK refused us; `reason_code` says why."""

    def __init__(self, reason_code: int) -> None:
        self.reason_code = reason_code
        reason = CONNACK_REASONS.get(reason_code, "unknown reason")
        super().__init__(f"broker refused the connection: {reason} (code {reason_code:#x})")


class IncomingMessages:
    """Received messages not yet taken by `receive()`; never drops."""

    __slots__ = ("_items", "high_water", "peak")

    def __init__(self, high_water: int) -> None:
        self._items: deque[Publish] = deque()
        self.high_water = high_water
        self.peak = 0

    def qsize(self) -> int:
        return len(self._items)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: MqttClient) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client._data_received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost(self, exc)

    def eof_received(self) -> bool | None:
        return None  # close


class MqttClient:
    """See the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        options: ConnectOptions,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 10.0,
        high_water: int = 1000,
        on_pause: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connection = ClientConnection(options)
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.incoming = IncomingMessages(high_water)
        self._on_pause = on_pause
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._disconnected: asyncio.Future[None] | None = None
        self._connack: asyncio.Future[ConnAck] | None = None
        self._receiver: asyncio.Future[None] | None = None
        self._acked: dict[int, asyncio.Future[int]] = {}  # our QoS 1 publishes, by packet id
        # `publish_tracked`'s QoS 1 publishes, by packet id: called with the PUBACK's reason
        self._ack_callbacks: dict[int, Callable[[int], None]] = {}
        self._requests: dict[int, asyncio.Future[list[int]]] = {}  # SUBSCRIBE/UNSUBSCRIBE
        self._flush_scheduled = False
        self._paused = False
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_sent = 0.0
        self._last_received = 0.0
        self._ping_sent_at = 0.0

    # ------------------------------------------------------------------ connection

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """Completes (with the reason as exception) once this connection is lost."""
        if self._disconnected is None:
            raise MqttError("not connected yet")
        return self._disconnected

    @property
    def is_connected(self) -> bool:
        return self.connection.state is State.CONNECTED and self._transport is not None

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    async def connect(self) -> ConnAck:
        """Open the connection and wait for the broker's CONNACK (at most
        `connect_timeout_s`); raises `ConnectRefusedError`, or `MqttError` caused by the
        socket's or TLS's error."""
        if self._transport is not None:
            raise MqttError("connect() while connected")
        loop = self._loop = asyncio.get_running_loop()
        self._disconnected = loop.create_future()
        self._disconnected.add_done_callback(_retrieve)
        self._connack = loop.create_future()
        self._connack.add_done_callback(_retrieve)
        self.incoming._items.clear()
        self._paused = False
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None,
                )
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._transport = transport  # type: ignore[assignment]
                self._protocol = protocol
                self.connection.connect()
                self._last_received = loop.time()
                self._flush()
                connack = await asyncio.shield(self._connack)
        except TimeoutError as exc:
            self._abort(
                MqttError(
                    f"no CONNACK from {self.host}:{self.port} within {self.connect_timeout_s:g}s"
                )
            )
            raise MqttError(
                f"connecting to {self.host}:{self.port} timed out after {self.connect_timeout_s:g}s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            self._abort(exc)
            raise MqttError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException as exc:
            self._abort(exc if isinstance(exc, Exception) else MqttError("cancelled"))
            raise
        if connack.reason_code:
            error = ConnectRefusedError(connack.reason_code)
            self._abort(error)
            raise error
        self._schedule_keepalive()
        return connack

    async def disconnect(self, timeout_s: float = 2.0) -> None:
        """Send DISCONNECT (the broker then drops the will) and close."""
        transport = self._transport
        if transport is None:
            return
        if self.connection.state is State.CONNECTED:
            self.connection.disconnect()
            self._flush()
        transport.close()
        disconnected = self._disconnected
        if disconnected is not None and not disconnected.done():
            await asyncio.wait({disconnected}, timeout=timeout_s)
        if transport is self._transport:  # close() did not call connection_lost in time
            self._abort(None)

    def _abort(self, exc: BaseException | None) -> None:
        transport = self._transport
        if transport is not None:
            transport.abort()
        self._lost(exc)

    def _connection_lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        self._transport = None
        self._protocol = None
        self.connection.connection_lost()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        error = exc if isinstance(exc, MqttError) else ConnectionLostError("connection lost")
        if exc is not None and error is not exc:
            error.__cause__ = exc
        for future in (self._disconnected, self._connack, self._receiver):
            if future is not None and not future.done():
                future.set_exception(error)
        for request in self._requests.values():
            if not request.done():
                request.set_exception(error)
        self._requests.clear()

    # ------------------------------------------------------------------ reading

    def _data_received(self, protocol: _Protocol | None, data: bytes) -> None:
        if protocol is not self._protocol or protocol is None:
            return
        incoming = self.incoming
        # Decode no more messages than `incoming` has room for: the rest stay as bytes until
        # `resume_reading` (one read may hold hundreds of messages).
        room = max(1, incoming.high_water - len(incoming._items))
        try:
            events = self.connection.receive_data(data, room)
        except ProtocolError as exc:
            self._abort(MqttError(f"broker {self.host}:{self.port} broke the protocol: {exc}"))
            return
        assert self._loop is not None
        self._last_received = self._loop.time()
        acked: list[tuple[Callable[[int], None], int]] | None = None
        for event in events:
            if isinstance(event, Publish):
                incoming._items.append(event)
            elif isinstance(event, PubAck):
                callback = self._ack_callbacks.pop(event.packet_id, None)
                if callback is not None:
                    # Called after this loop: a callback may publish, and the new publish
                    # may take a packet id acked further down `events`.
                    if acked is None:
                        acked = []
                    acked.append((callback, event.reason_code))
                    continue
                done = self._acked.pop(event.packet_id, None)
                if done is not None and not done.done():
                    done.set_result(event.reason_code)
            elif isinstance(event, SubAck | UnsubAck):
                request = self._requests.pop(event.packet_id, None)
                if request is not None and not request.done():
                    request.set_result(event.reason_codes)
            elif isinstance(event, ConnAck):
                if self._connack is not None and not self._connack.done():
                    self._connack.set_result(event)
            elif isinstance(event, Disconnect):
                if acked is not None:
                    self._call_ack_callbacks(acked)  # acked before it: done, not resent
                self._abort(
                    ConnectionLostError(
                        f"broker sent DISCONNECT (reason {event.reason_code:#x}"
                        + (
                            f": {event.properties['reason_string']}"
                            if "reason_string" in event.properties
                            else ""
                        )
                        + ")"
                    )
                )
                return
        if acked is not None:
            self._call_ack_callbacks(acked)
        size = len(incoming._items)
        if size:
            if size > incoming.peak:
                incoming.peak = size
            receiver = self._receiver
            if receiver is not None and not receiver.done():
                receiver.set_result(None)
            if size >= incoming.high_water:
                self.pause_reading()
        if len(events) == room and not self._paused and self.connection.buffered:
            self._loop.call_soon(self._data_received, protocol, b"")  # decode the rest
        if self.connection._out:
            self._schedule_flush()  # e.g. publishes released by a PUBACK

    async def receive(self) -> Publish:
        """The next message (a `codec.Publish`; ack QoS 1 ones with `ack`). Raises
        `MqttError` once the connection is lost."""
        items = self.incoming._items
        while True:
            disconnected = self._disconnected
            if disconnected is None or disconnected.done():
                raise ConnectionLostError("not connected") from (
                    disconnected.exception() if disconnected is not None else None
                )
            if items:
                return items.popleft()
            assert self._loop is not None
            self._receiver = self._loop.create_future()
            self._receiver.add_done_callback(_retrieve)
            try:
                await self._receiver
            finally:
                self._receiver = None

    @property
    def reading_paused(self) -> bool:
        return self._paused

    def pause_reading(self) -> None:
        """Stop reading the socket (TCP flow control pushes back on the broker)."""
        if self._paused or self._transport is None:
            return
        self._paused = True
        self._transport.pause_reading()
        if self._on_pause is not None:
            self._on_pause()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._transport is not None:
            self._transport.resume_reading()
            if self.connection.buffered and self._loop is not None:
                self._loop.call_soon(self._data_received, self._protocol, b"")

    # ------------------------------------------------------------------ writing

    def ack(self, packet_id: int, qos: int = 1) -> bool:
        """PUBACK a QoS 1 message received on this connection (QoS 0: nothing to do); False
        when the connection it came on is gone."""
        if qos == 0:
            return self._transport is not None
        if self._transport is None or not self.connection.ack(packet_id):
            return False
        self._schedule_flush()
        return True

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> tuple[int, asyncio.Future[int]]:
        """Queue a PUBLISH; the future completes with the PUBACK's reason code (QoS 1), or
        with 0 at once (QoS 0, queued for this iteration's write). A QoS 1 publish survives
        reconnects of this object (resent with DUP); `forget_publish` gives up on it.
        Raises `ProtocolError` for what cannot be sent (a QoS 2, a topic too long, QoS 0
        while disconnected)."""
        loop = self._loop or asyncio.get_running_loop()
        packet_id = self.connection.publish(topic, payload, qos, retain, properties)
        done: asyncio.Future[int] = loop.create_future()
        if qos == 0:
            done.set_result(0)
        else:
            self._acked[packet_id] = done
        if self._transport is not None:
            self._schedule_flush()
        return packet_id, done

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int, on_acked: Callable[[int], None]
    ) -> int:
        """`publish_nowait` without a future: a QoS 1 publish's `on_acked(reason_code)` is
        called on its PUBACK, from the read that brought it (no loop iteration, no future per
        publish); returns its packet id. QoS 0 returns 0 and calls nothing (queued for this
        iteration's write). Same guarantees and errors as `publish_nowait`;
        `forget_publish` drops the callback too."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        packet_id = self.connection.publish(topic, payload, qos)
        if qos:
            self._ack_callbacks[packet_id] = on_acked
        if self._transport is not None:
            self._schedule_flush()
        return packet_id

    def _call_ack_callbacks(self, acked: list[tuple[Callable[[int], None], int]]) -> None:
        for callback, reason_code in acked:
            try:
                callback(reason_code)
            except Exception as exc:  # as a future's callback would: logged, the rest go on
                assert self._loop is not None
                self._loop.call_exception_handler(
                    {"message": "MQTT PUBACK callback failed", "exception": exc}
                )

    def forget_publish(self, packet_id: int) -> None:
        """Stop tracking (and resending) a QoS 1 publish nobody waits for any more."""
        self._acked.pop(packet_id, None)
        self._ack_callbacks.pop(packet_id, None)
        self.connection.forget(packet_id)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        timeout: float | None = None,
    ) -> int:
        """Publish and wait for the PUBACK (QoS 1); returns its reason code. Raises
        `MqttError` if the connection is lost first or `timeout` passes (the publish is then
        forgotten)."""
        if not self.is_connected:
            raise ConnectionLostError("publish() without a connection")
        packet_id, done = self.publish_nowait(topic, payload, qos, retain, properties)
        if done.done():
            return done.result()
        try:
            return await self._until_lost(done, timeout, f"PUBACK for {topic!r}")
        finally:
            if not done.done():
                self.forget_publish(packet_id)

    async def subscribe(
        self, topic_filter: str, qos: int = 0, timeout: float | None = None, options: int = 0
    ) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK; returns its reason codes (granted QoS, or
        >= 0x80 for a refusal). `options` adds MQTT 5 subscription options bits."""
        if not self.is_connected:
            raise ConnectionLostError("subscribe() without a connection")
        packet_id = self.connection.subscribe([(topic_filter, qos | options)])
        assert self._loop is not None
        request: asyncio.Future[list[int]] = self._loop.create_future()
        request.add_done_callback(_retrieve)
        self._requests[packet_id] = request
        self._schedule_flush()
        return await self._until_lost(request, timeout, f"SUBACK for {topic_filter!r}")

    async def _until_lost(
        self, future: asyncio.Future[Any], timeout: float | None, what: str
    ) -> Any:
        disconnected = self.disconnected
        await asyncio.wait(
            {future, disconnected}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if future.done():
            return future.result()
        if disconnected.done():
            raise ConnectionLostError(f"connection lost while waiting for the {what}") from (
                disconnected.exception()
            )
        raise MqttError(f"no {what} within {timeout:g}s")

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None:
            return
        data = self.connection.data_to_send()
        if data:
            transport.write(data)
            assert self._loop is not None
            self._last_sent = self._loop.time()

    # ------------------------------------------------------------------ keepalive

    def _schedule_keepalive(self) -> None:
        keepalive = self.connection.keepalive
        if keepalive <= 0 or self._loop is None:
            return
        self._keepalive_timer = self._loop.call_later(keepalive / 4, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive_timer = None
        if not self.is_connected or self._loop is None:
            return
        keepalive = self.connection.keepalive
        now = self._loop.time()
        if self.connection.pings_outstanding and now - self._ping_sent_at >= keepalive:
            if self._last_received < self._ping_sent_at:
                self._abort(
                    ConnectionLostError(
                        f"keepalive timeout: nothing from the broker within "
                        f"{keepalive}s of a PINGREQ"
                    )
                )
                return
            self.connection.pings_outstanding = 0  # the broker is alive: ping again below
        if not self.connection.pings_outstanding and now - self._last_sent >= keepalive / 2:
            self.connection.ping()
            self._ping_sent_at = now
            self._flush()
        self._schedule_keepalive()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
