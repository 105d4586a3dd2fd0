"""`McpGateway`: the gateway's MCP server (the SDK's low-level `Server`) over its tools and
agent-state resources, with each request's API token deciding what it sees and may do.

- A token sees the tools of the classes it may reach; a read-only token sees only the tools
  that change nothing, and calling one that does is refused (an MCP error result naming the
  token). Tools that take an `agent_class` argument check it against the token too.
- Every tool call is logged with the token's name, the tool and the outcome.
- Tool failures (bad arguments, an agent method that raised, a refusal) are MCP error results
  (`isError: true`) whose text says what went wrong; an unknown tool is a protocol error.

The HTTP transport (`gatewayd.api.mcp`) authenticates the request and leaves the token in
the request's state (`gw_token`); a request without one (an in-process transport) is trusted.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.subscriptions import ListenHandler
from mcp.shared.exceptions import MCPError
from prometheus_client import Counter

from gatewayd import __version__
from gatewayd.api.tokens import ApiToken
from gatewayd.mcp.access import TRUSTED, AccessDenied, calling_as, check_class, check_write
from gatewayd.mcp.agent_index import AgentIndex
from gatewayd.mcp.catalog import ServedTool
from gatewayd.mcp.jsonable import dumps, jsonable
from gatewayd.mcp.resources import StateNotifier, agent_uri, parse_agent_uri
from gatewayd.tools import ToolError

log = logging.getLogger(__name__)

TOOL_CALLS = Counter(
    "gatewayd_mcp_tool_calls_total",
    "MCP tool calls, by tool and outcome (ok, failed, refused)",
    ["tool", "outcome"],
)

INSTRUCTIONS = (
    "gatewayd: an edge gateway whose devices and services are stateful agents, each of a class "
    "and with an id. Discover first (agent_classes_list, agents_list, agent_state_get), then "
    "act with the <class>_<method> tools or agent_call. Agent state is also a resource, "
    "agent://{class}/{id}, that notifies subscribers when it changes."
)


class McpGateway:
    def __init__(
        self,
        tools: list[ServedTool],
        runtime: Any,
        index: AgentIndex,
        notifier: StateNotifier,
        max_items: int = 200,
    ) -> None:
        self.tools = {served.name: served for served in tools}
        self.runtime = runtime
        self.index = index
        self.notifier = notifier
        self.max_items = max_items
        self._listen = ListenHandler(notifier.bus)

    def build_server(self) -> Server[Any]:
        return Server(
            "gatewayd",
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_subscribe_resource=self._subscribe,
            on_unsubscribe_resource=self._unsubscribe,
            on_subscriptions_listen=self._subscriptions_listen,
        )

    def close_streams(self) -> None:
        self._listen.close()

    # -- tools ----------------------------------------------------------------------------

    def visible(self, token: ApiToken, served: ServedTool) -> bool:
        if served.agent_class is not None and not token.allows_class(served.agent_class):
            return False
        return served.tool.read_only or not token.read_only

    async def _list_tools(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        token = token_of(ctx)
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=served.name,
                    description=served.tool.description,
                    input_schema=dict(served.tool.parameters),
                    annotations=types.ToolAnnotations(
                        read_only_hint=served.tool.read_only,
                        destructive_hint=False if served.tool.read_only else None,
                    ),
                )
                for served in self.tools.values()
                if self.visible(token, served)
            ]
        )

    async def _call_tool(
        self, ctx: Any, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        token = token_of(ctx)
        served = self.tools.get(params.name)
        if served is None or (
            served.agent_class is not None and not token.allows_class(served.agent_class)
        ):
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {params.name!r} (tools/list)")
        args = dict(params.arguments or {})
        started = time.monotonic()
        outcome = "ok"
        try:
            if served.class_arg is not None and isinstance(args.get(served.class_arg), str):
                check_class(token, args[served.class_arg])
            if not served.tool.read_only:
                check_write(token, served.name)
            with calling_as(token):
                result = await served.tool.invoke(args)
        except AccessDenied as err:
            outcome = "refused"
            return _error_result(str(err))
        except ToolError as err:
            outcome = "failed"
            return _error_result(str(err))
        except Exception as err:  # the agent's method raised, or the runtime refused the call
            outcome = "failed"
            return _error_result(f"{served.name} failed: {type(err).__name__}: {err}")
        finally:
            TOOL_CALLS.labels(served.name, outcome).inc()
            log.info(
                "mcp: %s called %s: %s",
                token.name,
                served.name,
                outcome,
                extra={
                    "fields": {
                        "token": token.name,
                        "tool": served.name,
                        "outcome": outcome,
                        "ms": round((time.monotonic() - started) * 1000, 1),
                    }
                },
            )
        value = jsonable(result)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=dumps(value))],
            structured_content=value if isinstance(value, dict) else {"result": value},
        )

    # -- resources ------------------------------------------------------------------------

    async def _list_resources(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        token = token_of(ctx)
        classes = [name for name in self.runtime.classes if token.allows_class(name)]
        found, _more = await self.index.find(classes, "", self.max_items)
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    name=f"{agent.agent_class}/{agent.agent_id}",
                    uri=agent_uri(agent.agent_class, agent.agent_id),
                    description=f"state of {agent.agent_class} agent {agent.agent_id!r}",
                    mime_type="application/json",
                )
                for agent in found
            ]
        )

    async def _list_templates(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        token = token_of(ctx)
        return types.ListResourceTemplatesResult(
            resource_templates=[
                types.ResourceTemplate(
                    name=f"{name} state",
                    uri_template=f"agent://{name}/{{id}}",
                    description=f"the state of a {name} agent (its id percent-encoded)",
                    mime_type="application/json",
                )
                for name in sorted(self.runtime.classes)
                if token.allows_class(name)
            ]
        )

    def _checked_uri(self, token: ApiToken, uri: str) -> tuple[str, str]:
        try:
            agent_class, agent_id = parse_agent_uri(uri)
        except ValueError as err:
            raise MCPError(types.INVALID_PARAMS, str(err)) from None
        if agent_class not in self.runtime.classes:
            raise MCPError(types.INVALID_PARAMS, f"{uri}: no agent class {agent_class!r}")
        if not token.allows_class(agent_class):
            raise MCPError(
                types.INVALID_PARAMS,
                f"{uri}: token {token.name!r} may not reach agent class {agent_class!r}",
            )
        return agent_class, agent_id

    async def _read_resource(
        self, ctx: Any, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        token = token_of(ctx)
        uri = str(params.uri)
        agent_class, agent_id = self._checked_uri(token, uri)
        from gatewayd.agents.storage import agent_db_path

        if not agent_db_path(self.runtime.settings.state_dir, agent_class, agent_id).exists():
            raise MCPError(types.INVALID_PARAMS, f"{uri}: no such agent")
        state = await self.runtime.get_agent_state(agent_class, agent_id)
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(uri=uri, mime_type="application/json", text=dumps(state))
            ]
        )

    async def _subscribe(self, ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        self._checked_uri(token_of(ctx), uri)
        connection = _connection_of(ctx)
        self.notifier.subscribe_session(uri, connection, ctx.session)
        exit_stack = getattr(connection, "exit_stack", None)
        if exit_stack is not None and not getattr(connection, "_gw_mcp_cleanup", False):
            exit_stack.callback(self.notifier.forget_connection, connection)
            connection._gw_mcp_cleanup = True  # type: ignore[attr-defined]
        return types.EmptyResult()

    async def _unsubscribe(
        self, ctx: Any, params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        self.notifier.unsubscribe_session(str(params.uri), _connection_of(ctx))
        return types.EmptyResult()

    async def _subscriptions_listen(
        self, ctx: Any, params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        token = token_of(ctx)
        uris = [str(uri) for uri in params.notifications.resource_subscriptions or ()]
        for uri in uris:
            self._checked_uri(token, uri)
        release = self.notifier.listening(uris)
        try:
            return await self._listen(ctx, params)
        finally:
            release()


def token_of(ctx: Any) -> ApiToken:
    """The API token the HTTP transport authenticated (`TRUSTED` in-process)."""
    request = getattr(ctx, "request", None)
    if request is None:
        return TRUSTED
    token = request.scope.get("state", {}).get("gw_token")
    if not isinstance(token, ApiToken):
        raise MCPError(types.INVALID_REQUEST, "request was not authenticated")
    return token


def _connection_of(ctx: Any) -> object:
    return getattr(ctx.session, "_connection", ctx.session)


def _error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=message)], is_error=True
    )
