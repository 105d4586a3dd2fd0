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
from collections.abc import Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho

# Small PUBACKs and replies must not wait for Nagle + delayed ACK (~40 ms each).
TCP_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


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
        self._client.manual_ack_set(True)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """Completes (with the reason as exception) once the connection is lost."""
        return self._disconnected

    @property
    def reading_paused(self) -> bool:
        return self._paused_socket is not None

    def ack(self, mid: int, qos: int) -> bool:
        """PUBACK (QoS 1) / PUBCOMP (QoS 2) on this connection; False if it is gone."""
        return self._client.ack(mid, qos) == paho.MQTT_ERR_SUCCESS

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
