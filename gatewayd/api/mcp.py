"""Feature "mcp": the gateway's MCP server (`gatewayd.mcp`) at `[mcp] path` (default `/mcp`),
Streamable HTTP transport, on the API server.

Each request needs a bearer token with the `mcp` scope (401/403 in the API's JSON error shape
otherwise); an MCP session is bound to the token that opened it (another token gets 404 for
it). The session manager and the state notifications live as long as the API server (the
feature's lifespan), and the observability group's log ring is installed for that time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import HTTPConnection
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gatewayd.api.errors import ApiError, error_response
from gatewayd.api.features import FeatureRoutes
from gatewayd.api.tokens import require_token
from gatewayd.logring import LogRing
from gatewayd.mcp.agent_index import AgentIndex
from gatewayd.mcp.catalog import GroupContext, build_catalog
from gatewayd.mcp.resources import StateNotifier
from gatewayd.mcp.server import McpGateway


class _Endpoint:
    """Authenticates, then hands the request to the SDK's session manager."""

    def __init__(self, manager: StreamableHTTPSessionManager) -> None:
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            token = require_token(HTTPConnection(scope), "mcp")
        except ApiError as err:
            response = error_response(err.status, err.message, type=err.type, code=err.code)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["gw_token"] = token
        # The session manager binds each session to the principal that opened it.
        scope["user"] = AuthenticatedUser(
            AccessToken(token=token.name, client_id=token.name, scopes=sorted(token.scopes))
        )
        await self.manager.handle_request(scope, receive, send)


def build_gateway(components: Any) -> tuple[McpGateway, LogRing | None]:
    section = components.config.mcp
    # Cluster mode: calls of agents another member serves are forwarded to it.
    runtime = getattr(components, "routed_runtime", None) or components.runtime
    logs = (
        LogRing(section.log_lines)
        if "observability" in section.tool_groups and section.log_lines > 0
        else None
    )
    index = AgentIndex(runtime.settings.state_dir)
    context = GroupContext(
        runtime=runtime,
        engine=components.engine,
        config=components.config,
        index=index,
        logs=logs,
        max_items=section.max_list_items,
        generators=getattr(components, "generators", None) or {},
    )
    tools = build_catalog(context, section.tool_groups, section.classes)
    gateway = McpGateway(tools, runtime, index, StateNotifier(), section.max_list_items)
    return gateway, logs


def routes(components: Any) -> FeatureRoutes | list[Any]:
    if components is None or getattr(components, "runtime", None) is None:
        return []
    section = components.config.mcp
    if not section.enabled:
        return []
    gateway, logs = build_gateway(components)
    manager = StreamableHTTPSessionManager(app=gateway.build_server())

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        gateway.notifier.attach(components.runtime)
        if logs is not None:
            logs.install()
        try:
            async with manager.run():
                try:
                    yield
                finally:
                    gateway.close_streams()
        finally:
            await gateway.notifier.close()
            if logs is not None:
                logs.remove()

    endpoint = _Endpoint(manager)
    return FeatureRoutes(
        [Route(section.path, endpoint=endpoint, methods=["GET", "POST", "DELETE"])],
        lifespan=lifespan(),
        summary=f"{section.path} (MCP, {len(gateway.tools)} tools)",
    )
