"""An MCP server for agents to connect to: the SDK's `MCPServer` over Streamable HTTP on a
fixed local port (so that it can go away and come back at the same address), behind a bearer
token check."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Bearer:
    def __init__(self, app: ASGIApp, secret: str, seen: list[str]) -> None:
        self.app, self.secret, self.seen = app, secret, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != f"Bearer {self.secret}".encode():
                await JSONResponse({"error": "bad token"}, status_code=401)(scope, receive, send)
                return
            self.seen.append(scope["method"])
        await self.app(scope, receive, send)


def weather_server() -> MCPServer:
    server = MCPServer("weather")

    @server.tool()
    def temperature(city: str) -> dict[str, Any]:
        """The temperature in a city."""
        return {"city": city, "celsius": 21.5}

    @server.tool()
    def fail(reason: str) -> str:
        """Always fails, saying why."""
        raise ToolError(reason)

    return server


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave the test run's signals alone
        yield


class RemoteMcpServer:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = free_port()
        self.requests: list[str] = []
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self) -> None:
        app = _Bearer(weather_server().streamable_http_app(), self.secret, self.requests)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, lifespan="on", log_config=None,
            access_log=False, timeout_graceful_shutdown=1,
        )  # fmt: skip
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None
