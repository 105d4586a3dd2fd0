"""No secret reaches the logs at DEBUG during a real WebSocket handshake and exchange."""

from __future__ import annotations

import logging

import pytest
from websockets.asyncio.client import connect

from protocols.ws import WsListener, WsSettings
from protocols.ws_logs import redact_path
from tests.protocols.test_ws import EchoHandler

pytestmark = pytest.mark.timeout(30)

TOKEN = "tok-3c1f9e7a5b"
BEARER = "bearer-a8d2e4f6b0c1"
COOKIE = "session-77e1d0c9f3"
API_KEY = "apikey-5b9c2e8d1a"
SUBPROTOCOL_TOKEN = "subproto-e2a4c6b8d0"
MESSAGE_SECRET = "msgsecret-9f8e7d6c5b"


async def test_debug_logs_of_a_handshake_carry_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # before the connection: the library checks it per protocol
    listener = WsListener(WsSettings(port=0), EchoHandler())
    await listener.start()
    try:
        url = f"ws://127.0.0.1:{listener.bound_port}/agents/echo/d1?token={TOKEN}&v=2"
        headers = {"Authorization": f"Bearer {BEARER}", "Cookie": COOKIE, "X-Api-Key": API_KEY}
        async with connect(
            url,
            additional_headers=headers,
            subprotocols=[SUBPROTOCOL_TOKEN],  # type: ignore[list-item]
        ) as client:
            assert await client.recv() == "hello d1"
            await client.send(f'{{"auth": "{MESSAGE_SECRET}"}}')
            assert MESSAGE_SECRET in str(await client.recv())
            assert client.request is not None and client.response is not None
            key = client.request.headers["Sec-WebSocket-Key"]
            accept = client.response.headers["Sec-WebSocket-Accept"]
    finally:
        await listener.stop()

    # Only the gateway's side: the test's own client logs under "websockets.client".
    server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith("websockets")]
    text = "\n".join(server_lines)
    assert "< GET /agents/echo/d1?token=[redacted]&v=[redacted] HTTP/1.1" in text, text
    assert "< Sec-WebSocket-Key: [redacted]" in text
    assert "< Host: 127.0.0.1" in text  # harmless headers stay readable
    assert "< TEXT [" in text  # frames are logged by kind and size
    for secret in (TOKEN, BEARER, COOKIE, API_KEY, SUBPROTOCOL_TOKEN, MESSAGE_SECRET, key, accept):
        assert secret not in text, f"{secret!r} was logged"


def test_redact_path_keeps_the_route_and_parameter_names() -> None:
    assert redact_path("/agents/a/b") == "/agents/a/b"
    assert redact_path("/agents/a/b?token=x&y") == "/agents/a/b?token=[redacted]&y=[redacted]"
