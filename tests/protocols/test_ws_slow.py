"""A dashboard that stops reading is disconnected with 1013 once its buffer limit is passed,
promptly (even while the socket is full), and never slows the sender or other clients."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import pytest
from websockets.asyncio.client import connect

from protocols.link import Link, Outcome
from protocols.ws import SLOW_CONSUMER_CODE, WsListener, WsSettings

pytestmark = pytest.mark.timeout(30)


class RecordingHandler:
    """Keeps the open links and reports each close_link through a future per link id."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self.opened = asyncio.Queue[Link]()
        self.closed: dict[str, asyncio.Future[tuple[int, str]]] = {}

    def _done(self) -> asyncio.Future[Outcome]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(Outcome.APPLIED)
        return future

    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        self.links[link.link_id] = link
        self.closed[link.link_id] = asyncio.get_running_loop().create_future()
        self.opened.put_nowait(link)
        return self._done()

    def submit_message(self, link: Link, data: bytes | str, dedup: Any = None) -> Any:
        return self._done()

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        self.closed[link.link_id].set_result((code, reason))
        return self._done()


def _stalled_client(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /agents/dash/a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    return sock


async def test_stalled_dashboard_is_closed_1013_and_others_keep_receiving() -> None:
    handler = RecordingHandler()
    settings = WsSettings(
        port=0, max_outbound_frames=16, max_outbound_bytes=1_000_000, ping_interval_s=None
    )
    listener = WsListener(settings, handler)
    await listener.start()
    stalled = await asyncio.to_thread(_stalled_client, listener.bound_port)
    try:
        slow = await handler.opened.get()
        async with connect(f"ws://127.0.0.1:{listener.bound_port}/agents/dash/b") as healthy:
            fast = await handler.opened.get()
            frame = b"x" * 65536
            sent = 0
            # Broadcast to both, as an agent would: `send` must never block, and the stalled
            # client must be cut off once the socket is full and its buffer limit passed.
            while not handler.closed[slow.link_id].done() and sent < 2000:
                slow.send(frame)
                fast.send(b"tick")
                sent += 1
                assert len(await healthy.recv()) == 4  # the healthy client keeps up
            async with asyncio.timeout(5):
                code, reason = await handler.closed[slow.link_id]
            assert code == SLOW_CONSUMER_CODE and "too slow" in reason
            assert listener.stats.extra["slow_consumer_closes"] == 1
            # The other dashboard is untouched.
            fast.send("still here")
            assert await healthy.recv() == "still here"
            assert not handler.closed[fast.link_id].done()
    finally:
        stalled.close()
        await listener.stop()


async def test_buffer_limit_counts_bytes_not_only_frames() -> None:
    handler = RecordingHandler()
    settings = WsSettings(port=0, max_outbound_frames=1000, max_outbound_bytes=100_000)
    listener = WsListener(settings, handler)
    await listener.start()
    stalled = await asyncio.to_thread(_stalled_client, listener.bound_port)
    try:
        slow = await handler.opened.get()
        # One frame larger than the whole byte budget: disconnected at once, frames 1 < 1000.
        slow.send(b"y" * 200_000)
        async with asyncio.timeout(5):
            code, _ = await handler.closed[slow.link_id]
        assert code == SLOW_CONSUMER_CODE
    finally:
        stalled.close()
        await listener.stop()
