"""WebSocket transport with real sockets and a minimal LinkHandler on the other side."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocols.link import Link, LinkRejected, Outcome
from protocols.ws import BadPath, WsListener, WsSettings, parse_agent_path
from tests.connect_storm import connect_storm, skip_unless_somaxconn_allows
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


class EchoHandler:
    """Answers every message on the link after 'committing' (resolving the future)."""

    def __init__(self, known_classes=("echo",)) -> None:
        self.known = known_classes
        self.opened: list[tuple[Link, dict[str, Any]]] = []
        self.messages: list[bytes | str] = []
        self.closed: list[tuple[str, int]] = []

    def _done(self, value: Any = Outcome.APPLIED) -> asyncio.Future[Outcome]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(value)
        return future

    def open_link(self, link, context):
        if link.route.agent_class not in self.known:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(LinkRejected(f"unknown agent class {link.route.agent_class!r}"))
            return future
        self.opened.append((link, context))
        link.send(f"hello {link.route.agent_id}")
        return self._done()

    def submit_message(self, link, data, dedup=None):
        self.messages.append(data)
        if data == "close me":
            link.close(4000, "as you wish")
        else:
            link.send(data)
        return self._done()

    def close_link(self, link, code, reason):
        self.closed.append((link.link_id, code))
        return self._done()


@pytest.fixture
async def listener():
    handler = EchoHandler()
    ws = WsListener(WsSettings(port=0, max_frame_bytes=1024, max_connections=3), handler)
    await ws.start()
    yield ws, handler
    await ws.stop()


def test_parse_agent_path():
    assert parse_agent_path("/agents/thermo/abc").agent_id == "abc"
    route = parse_agent_path("/agents/thermo/a%2Fb%20%E6%97%A5?x=1")
    assert (route.agent_class, route.agent_id) == ("thermo", "a/b 日")
    for bad in (
        "/",
        "/agents/thermo",
        "/agents/thermo/",
        "/agents//x",
        "/x/t/i",
        "/agents/t/i/j",
        "/agents/t/%ff",
    ):
        with pytest.raises(BadPath):
            parse_agent_path(bad)


async def test_text_and_binary_round_trip(listener):
    ws, handler = listener
    url = f"ws://127.0.0.1:{ws.bound_port}/agents/echo/dev%201"
    async with connect(url) as client:
        assert await client.recv() == "hello dev 1"
        await client.send("text")
        await client.send(b"\x00\xffbinary")
        assert await client.recv() == "text"
        assert await client.recv() == b"\x00\xffbinary"
    await wait_until(lambda: handler.closed and ws.stats.links_open == 0, 5, "the link's close")
    assert handler.messages == ["text", b"\x00\xffbinary"]
    assert handler.opened[0][1]["path"] == "/agents/echo/dev%201"
    assert handler.closed and handler.closed[0][1] == 1000
    stats = ws.stats
    assert stats.messages_in == 2 and stats.messages_out == 3 and stats.links_open == 0


async def test_bad_path_is_404_with_a_message(listener):
    ws, _ = listener
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{ws.bound_port}/nope"):
            pass
    assert info.value.response.status_code == 404
    assert b"/agents/{class}/{id}" in info.value.response.body


async def test_rejected_link_is_closed_with_reason(listener):
    ws, _ = listener
    async with connect(f"ws://127.0.0.1:{ws.bound_port}/agents/nope/1") as client:
        with pytest.raises(ConnectionClosed) as info:
            await client.recv()
    assert info.value.rcvd.code == 1008
    assert "unknown agent class 'nope'" in info.value.rcvd.reason


async def test_oversized_frame_closes_1009_and_server_keeps_serving(listener):
    ws, _ = listener
    url = f"ws://127.0.0.1:{ws.bound_port}/agents/echo/x"
    async with connect(url) as client:
        await client.recv()
        await client.send(b"x" * 2000)
        with pytest.raises(ConnectionClosed) as info:
            await client.recv()
        assert info.value.rcvd.code == 1009
    async with connect(url) as client:
        await client.recv()
        await client.send("still here")
        assert await client.recv() == "still here"


async def test_gateway_close_and_connection_limit(listener):
    ws, _ = listener
    url = f"ws://127.0.0.1:{ws.bound_port}/agents/echo/x"
    async with connect(url) as client:
        await client.recv()
        await client.send("close me")
        with pytest.raises(ConnectionClosed) as info:
            await client.recv()
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4000, "as you wish")
    clients = [await connect(url) for _ in range(3)]
    try:
        with pytest.raises(InvalidStatus) as info:
            await connect(url)
        assert info.value.response.status_code == 503
    finally:
        for client in clients:
            await client.close()


async def test_a_connect_storm_is_queued_by_the_kernel_not_dropped():
    """The listen queue holds max_connections handshakes while the loop is busy (asyncio's
    default backlog of 100 dropped the rest: their clients retried 1, 3, 7 s later)."""
    storm = 250
    skip_unless_somaxconn_allows(storm)
    ws = WsListener(WsSettings(port=0, max_connections=storm + 10), EchoHandler())
    await ws.start()
    try:
        assert connect_storm(ws.bound_port, storm) == storm
    finally:
        await ws.stop()
