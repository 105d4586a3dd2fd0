"""`gatewayd mcp -c CONFIG`: the gateway's MCP server over stdio, for desktop clients that
launch their MCP servers as commands.

It is a proxy: it connects to the running daemon's `/mcp` (the config's `[api] bind` and
`[mcp] path`) with the SDK's Streamable HTTP client and the bearer token from `--token-file`
(or the environment variable GATEWAYD_MCP_TOKEN), and forwards tools, resources and
subscriptions both ways. Serving in-process instead would open the agents' databases next to
the daemon's; through the daemon every call is a turn of the one runtime, checked and logged
under the token like any HTTP client's. Its own log lines go to stderr (stdout is the
protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp.shared._httpx_utils import create_mcp_http_client

from gatewayd import __version__

log = logging.getLogger(__name__)

TOKEN_ENV = "GATEWAYD_MCP_TOKEN"


class ProxyError(Exception):
    """The proxy cannot start; the message says what to fix."""


def daemon_url(config: Any) -> str:
    host, port = config.api.bind
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{config.mcp.path}"


def read_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise ProxyError(f"cannot read the token file {token_file}: {err.strerror}") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ProxyError(
            f"no API token: pass --token-file FILE or set {TOKEN_ENV} (a token with the mcp "
            "scope from the daemon's api.tokens_file)"
        )
    return token


@contextlib.asynccontextmanager
async def upstream(url: str, token: str) -> AsyncIterator[Client]:
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(url, http_client=http), cache=None) as client,
    ):
        yield client


class McpProxy:
    """A low-level `Server` whose handlers forward to the daemon (`client`)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.bus = InMemorySubscriptionBus()
        self._listen = ListenHandler(self.bus)
        self._relays: dict[tuple[object, str], asyncio.Task[None]] = {}

    def build_server(self) -> Server[Any]:
        info = self.client.server_info
        return Server(
            "gatewayd",
            version=__version__,
            instructions=self.client.instructions or (info.name if info else None),
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_subscribe_resource=self._subscribe,
            on_unsubscribe_resource=self._unsubscribe,
            on_subscriptions_listen=self._subscriptions_listen,
        )

    async def close(self) -> None:
        self._listen.close()
        for task in self._relays.values():
            task.cancel()

    async def _list_tools(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return await self.client.list_tools(cursor=params.cursor if params else None)

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> Any:
        return await self.client.call_tool(params.name, dict(params.arguments or {}))

    async def _list_resources(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return await self.client.list_resources(cursor=params.cursor if params else None)

    async def _list_templates(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return await self.client.list_resource_templates(cursor=params.cursor if params else None)

    async def _read_resource(
        self, ctx: Any, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        return await self.client.read_resource(str(params.uri))

    # Subscriptions: one upstream listen stream per subscribed URI, relayed downstream.

    async def _relay(self, uri: str, session: Any | None) -> None:
        async with self.client.listen(resource_subscriptions=[uri]) as events:
            async for event in events:
                if isinstance(event, ResourceUpdated):
                    if session is not None:
                        await session.send_resource_updated(event.uri)
                    else:
                        await self.bus.publish(event)

    async def _subscribe(self, ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        key = (getattr(ctx.session, "_connection", ctx.session), uri)
        if key not in self._relays:
            await self._check_readable(uri)
            self._relays[key] = asyncio.create_task(self._relay(uri, ctx.session))
        return types.EmptyResult()

    async def _unsubscribe(
        self, ctx: Any, params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        key = (getattr(ctx.session, "_connection", ctx.session), str(params.uri))
        task = self._relays.pop(key, None)
        if task is not None:
            task.cancel()
        return types.EmptyResult()

    async def _subscriptions_listen(
        self, ctx: Any, params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        uris = [str(uri) for uri in params.notifications.resource_subscriptions or ()]
        for uri in uris:
            await self._check_readable(uri)
        relays = [asyncio.create_task(self._relay(uri, None)) for uri in uris]
        try:
            return await self._listen(ctx, params)
        finally:
            for task in relays:
                task.cancel()

    async def _check_readable(self, uri: str) -> None:
        """The daemon's refusal (a bad URI, a class the token may not reach) as the answer."""
        await self.client.read_resource(uri)


async def serve_stdio(url: str, token: str) -> None:
    async with upstream(url, token) as client:
        proxy = McpProxy(client)
        server = proxy.build_server()
        try:
            async with stdio_server() as (read_stream, write_stream):
                await server.run(read_stream, write_stream, server.create_initialization_options())
        finally:
            await proxy.close()
