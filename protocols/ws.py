"""WebSocket transport: each client session on `/agents/{class}/{id}` becomes a `Link`.

Text frames reach the gateway as `str` (JSON protocol frames or user text), binary frames as
`bytes`, untouched. A wrong path is answered with HTTP 404 before the upgrade. Outbound frames
are live, not durable (no outbox: a dashboard that reconnects gets the current state again).
They go through a bounded per-connection buffer (`max_outbound_frames`, `max_outbound_bytes`);
`send` never blocks, so a slow dashboard never slows an agent. A peer whose buffer passes its
limit is disconnected at once: its buffer is dropped, it gets close code 1013 ("try again
later", with a reason) if its socket still takes it within `slow_close_timeout_s`, else the
TCP connection is aborted; the handler's `close_link` reports 1013 either way. Oversized inbound frames close the connection
with 1009 (done by the websockets library, `max_frame_bytes`).

Must never import `gatewayd` or `engine`: it talks to the gateway only through `LinkHandler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from prometheus_client import Counter
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from protocols.link import (
    Backpressure,
    LinkHandler,
    LinkIdentity,
    LinkRejected,
    Outcome,
    Route,
    TransportStats,
)
from protocols.ws_logs import library_logger

logger = logging.getLogger(__name__)

PATH_PREFIX = "agents"
_MAX_CLOSE_REASON_BYTES = 120  # the protocol allows 123 bytes


@dataclass(frozen=True, slots=True)
class WsSettings:
    """`bind` host and `port` (0 = any free port)."""

    bind: str = "127.0.0.1"
    port: int = 8765
    max_frame_bytes: int = 1_048_576
    max_connections: int = 10_000
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    # Outbound frames (and their total size: bytes, or characters of text frames) buffered per
    # connection before the peer counts as too slow and is disconnected (1013).
    max_outbound_frames: int = 1024
    max_outbound_bytes: int = 8 * 1024 * 1024
    slow_close_timeout_s: float = 1.0
    # Inbound messages submitted but not yet committed per connection (read backpressure).
    max_inflight_messages: int = 256

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes",
            "max_connections",
            "max_outbound_frames",
            "max_outbound_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ws.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ws.port must be 0..65535, got {self.port!r}")


class BadPath(ValueError):
    pass


def parse_agent_path(path: str) -> Route:
    """`/agents/{class}/{id}` (id percent-decoded as UTF-8; may contain encoded '/')."""
    raw = path.split("?", 1)[0]
    parts = raw.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != PATH_PREFIX:
        raise BadPath(f"path {raw!r} is not /{PATH_PREFIX}/{{class}}/{{id}}")
    try:
        agent_class = unquote(parts[2], errors="strict")
        agent_id = unquote(parts[3], errors="strict")
    except UnicodeDecodeError:
        raise BadPath(f"path {raw!r}: class or id is not valid percent-encoded UTF-8") from None
    if not agent_class or not agent_id:
        raise BadPath(f"path {raw!r}: empty agent class or id")
    return Route(agent_class, agent_id)


_CLOSE = object()
SLOW_CONSUMER_CODE = 1013  # "try again later": the client may reconnect and resync
SLOW_CONSUMER_REASON = "too slow: outbound buffer full"
WS_SLOW_CONSUMER_CLOSES = Counter(
    "gatewayd_ws_slow_consumer_closes_total",
    "WebSocket clients disconnected (1013) for not reading their frames",
)


class WsLink(LinkIdentity):
    """One WebSocket session as a `protocols.link.Link`."""

    TRANSPORT = "ws"

    def __init__(
        self, ws: ServerConnection, link_id: str, route: Route, listener: WsListener
    ) -> None:
        peer = ws.remote_address
        super().__init__(link_id, route, f"{peer[0]}:{peer[1]}" if peer else "?")
        self._ws = ws
        self._listener = listener
        self._outbound: deque[Any] = deque()
        self._queued_size = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self.dropped_as_slow = False  # closed by the gateway with SLOW_CONSUMER_CODE

    def send(self, data: bytes | str) -> None:
        """Queue a frame; never blocks. Past the buffer limit the peer is disconnected."""
        if self._closing:
            return
        settings = self._listener.settings
        size = len(data)
        if (
            len(self._outbound) >= settings.max_outbound_frames
            or self._queued_size + size > settings.max_outbound_bytes
        ):
            self._disconnect_slow()
            return
        self._outbound.append(data)
        self._queued_size += size
        self._wakeup.set()

    def _disconnect_slow(self) -> None:
        stats = self._listener._stats
        stats.extra["slow_consumer_closes"] = stats.extra.get("slow_consumer_closes", 0) + 1
        WS_SLOW_CONSUMER_CLOSES.inc()
        logger.warning(
            "ws: client %s (%s, agent %s/%s) is not reading: %d frames / %d bytes buffered "
            "(ws max_outbound_frames=%d, max_outbound_bytes=%d); disconnecting it with %d. "
            "Live frames only: it gets the current state when it reconnects",
            self._remote,
            self._link_id,
            self._route.agent_class,
            self._route.agent_id,
            len(self._outbound),
            self._queued_size,
            self._listener.settings.max_outbound_frames,
            self._listener.settings.max_outbound_bytes,
            SLOW_CONSUMER_CODE,
        )
        self._outbound.clear()
        self._queued_size = 0
        self._closing = True
        self.dropped_as_slow = True
        # The writer may be stuck in ws.send() waiting for the peer to read: stop it, then
        # close from a task of our own, bounded, and abort the connection if that stalls.
        if self._writer is not None:
            self._writer.cancel()
        task = asyncio.get_running_loop().create_task(self._close_slow())
        self._listener._background.add(task)
        task.add_done_callback(self._listener._background.discard)

    async def _close_slow(self) -> None:
        ws = self._ws
        try:
            async with asyncio.timeout(self._listener.settings.slow_close_timeout_s):
                await ws.close(SLOW_CONSUMER_CODE, SLOW_CONSUMER_REASON)
        except (TimeoutError, ConnectionClosed):
            pass
        finally:
            ws.transport.abort()

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closing:
            return
        self._closing = True
        encoded = reason.encode("utf-8")[:_MAX_CLOSE_REASON_BYTES]
        self._outbound.append((_CLOSE, code, encoded.decode("utf-8", errors="ignore")))
        self._wakeup.set()

    async def _write_forever(self) -> None:
        ws = self._ws
        stats = self._listener._stats
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._outbound:
                    item = self._outbound.popleft()
                    if isinstance(item, tuple) and item and item[0] is _CLOSE:
                        await ws.close(item[1], item[2])
                        return
                    self._queued_size -= len(item)
                    await ws.send(item)
                    stats.messages_out += 1
        except ConnectionClosed:
            pass


class WsListener:
    """Serves `/agents/{class}/{id}` and feeds every session to `handler`."""

    def __init__(self, settings: WsSettings, handler: LinkHandler) -> None:
        self.settings = settings
        self._handler = handler
        self._server: Server | None = None
        self._ids = itertools.count(1)
        self._stats = TransportStats()
        self._background: set[asyncio.Task[None]] = set()
        # Cluster mode's routing (gatewayd/cluster/routing.py): called with each connection's
        # route before its link opens; None serves the connection here, an awaitable serves
        # it instead (relays it to the member that owns the agent, or closes it).
        self.router: Callable[[Route, ServerConnection], Awaitable[None] | None] | None = None

    async def start(self) -> None:
        s = self.settings
        self._server = await serve(
            self._serve_connection,
            s.bind,
            s.port,
            process_request=self._check_request,
            max_size=s.max_frame_bytes,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            compression=None,  # cheaper on small frames; devices rarely negotiate it
            # The kernel queues up to max_connections handshakes while the loop is busy (a
            # fleet reconnecting after a restart); asyncio's default (100) drops the rest.
            backlog=s.max_connections,
            logger=library_logger(),  # redacts keys, tokens and payloads (ws_logs.py)
        )
        logger.info("ws: listening on %s:%d", s.bind, self.bound_port)

    @property
    def bound_port(self) -> int:
        if self._server is None:
            raise RuntimeError("ws listener is not started")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop listening and close every session (1001 going away).

        In-flight messages are not waited for: WebSocket has no acknowledgements to flush, and
        the runtime's own drain finishes every turn already queued."""
        if self._server is None:
            return
        self._server.close(close_connections=True)
        await self._server.wait_closed()
        self._server = None
        logger.info("ws: stopped")

    @property
    def stats(self) -> TransportStats:
        return self._stats

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        try:
            parse_agent_path(request.path)
        except BadPath as err:
            self._stats.rejected += 1
            return connection.respond(http.HTTPStatus.NOT_FOUND, f"{err}\n")
        if self._stats.links_open >= self.settings.max_connections:
            self._stats.rejected += 1
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many connections (ws.max_connections={self.settings.max_connections})\n",
            )
        return None

    async def _serve_connection(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        route = parse_agent_path(request.path)
        if self.router is not None:
            elsewhere = self.router(route, ws)
            if elsewhere is not None:
                self._stats.extra["routed_elsewhere"] = (
                    self._stats.extra.get("routed_elsewhere", 0) + 1
                )
                self._stats.links_open += 1  # counts against max_connections too
                try:
                    await elsewhere
                finally:
                    self._stats.links_open -= 1
                return
        link = WsLink(ws, f"ws-{next(self._ids)}", route, self)
        context = {
            "transport": "ws",
            "path": request.path,
            "headers": dict(request.headers.raw_items()),
            "remote": link.remote,
        }
        stats = self._stats
        stats.links_open += 1
        writer = asyncio.get_running_loop().create_task(link._write_forever())
        link._writer = writer
        inflight: deque[asyncio.Future[Outcome]] = deque()
        try:
            opened = self._handler.open_link(link, context)
            while (held := _held_back(opened)) is not None:
                await held.ready  # the agent's mailbox is full: wait, then open again
                opened = self._handler.open_link(link, context)
            opened.add_done_callback(lambda fut: self._after_open(link, fut))
            async for message in ws:
                stats.messages_in += 1
                future = self._handler.submit_message(link, message)
                while (held := _held_back(future)) is not None:
                    # The agent's mailbox is full: stop reading from this client (TCP flow
                    # control pushes back on it) and submit the same message again once
                    # there is room. Nothing is dropped.
                    await held.ready
                    future = self._handler.submit_message(link, message)
                future.add_done_callback(_consume_error)
                inflight.append(future)
                # Read backpressure: a client can't queue unbounded work in the agent.
                while len(inflight) > self.settings.max_inflight_messages:
                    with contextlib.suppress(Exception):
                        await inflight.popleft()
                while inflight and inflight[0].done():
                    inflight.popleft()
        except ConnectionClosed:
            pass
        finally:
            stats.links_open -= 1
            code = ws.close_code if ws.close_code is not None else 1006
            reason = ws.close_reason or ""
            if link.dropped_as_slow:
                code, reason = SLOW_CONSUMER_CODE, SLOW_CONSUMER_REASON
            closed = self._handler.close_link(link, code, reason)
            closed.add_done_callback(_consume_error)
            link._closing = True
            # Let queued frames (e.g. a close we initiated) go out, then stop the writer.
            link._wakeup.set()
            await asyncio.sleep(0)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _after_open(self, link: WsLink, future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():
            return
        err = future.exception()
        if err is None:
            return
        if isinstance(err, LinkRejected):
            self._stats.rejected += 1
            logger.info("ws: %s rejected for %s: %s", link.remote, link.route, err.reason)
            link.close(err.code, err.reason)
        else:
            logger.warning("ws: %s: connect failed: %s", link.remote, err)
            link.close(1011, "connect failed")


def _held_back(future: asyncio.Future[Any]) -> Backpressure | None:
    """The `Backpressure` the handler answered with at once (nothing was queued), if any."""
    if future.done() and not future.cancelled():
        err = future.exception()
        if isinstance(err, Backpressure):
            return err
    return None


def _consume_error(future: asyncio.Future[Any]) -> None:
    # Failures are reported to the client and logged by the gateway; the transport only needs
    # to not acknowledge, and WebSocket has no per-message acknowledgement.
    if not future.cancelled():
        future.exception()
