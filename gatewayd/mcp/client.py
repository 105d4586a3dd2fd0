"""Agents as MCP clients: `McpClientMixin` gives an agent `add_mcp_server`,
`remove_mcp_server`, `mcp_servers` (a status per server), `mcp_tools` (the servers' tools as
`gatewayd.tools.Tool`s named `<server>_<tool>`, e.g. for a chat agent's model) and
`call_mcp_tool`.

    class Assistant(McpClientMixin, Agent):
        @callable
        async def use_weather(self) -> dict:
            return await self.add_mcp_server("weather", "https://example.net/mcp",
                                             token_file="/etc/gatewayd/weather.token")

- A server is remembered in the agent's database (table `_gw_mcp_servers`, written in the
  turn that adds it). Headers are stored as given: prefer `token_file` (read at each
  connection, sent as `Authorization: Bearer <token>`) to a secret in `headers`.
- Each server has one connection task owned by the runtime (`AgentHost.start_task`): it
  outlives the agent's hibernation, connects with the SDK's Streamable HTTP client, lists the
  tools, probes the server every `mcp_probe_every_s`, and after any failure reconnects with
  exponential backoff (0.5 s doubling to 5 s, with jitter) for as long as the server is
  configured. The status says where it stands.
- On every wake the agent starts the connections its database lists and that are not running;
  an interval schedule (`mcp_keepalive`, every `mcp_keepalive_every_s`) wakes it after a
  restart, so connections come back without waiting for a message.
- The connections talk only to the MCP servers: nothing is ever sent to the agent's own
  connections (devices, dashboards), whether or not they take protocol messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from gatewayd.tools import Tool, ToolError

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0
CALL_TIMEOUT_S = 30.0
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_TOOL_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_TASK_PREFIX = "mcp-server:"
_TABLE = (
    "CREATE TABLE IF NOT EXISTS _gw_mcp_servers (name TEXT PRIMARY KEY, url TEXT NOT NULL, "
    "headers TEXT NOT NULL DEFAULT '{}', token_file TEXT, added_at REAL NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    name: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    token_file: str | None = None

    def request_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.token_file is not None:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as err:
                raise ConnectionError(
                    f"cannot read token_file {self.token_file}: {err.strerror}"
                ) from None
            headers["Authorization"] = f"Bearer {token}"
        return headers


class McpServerLink:
    """One agent's connection to one MCP server (see the module docstring)."""

    def __init__(self, spec: McpServerSpec, *, probe_every_s: float = 15.0) -> None:
        self.spec = spec
        self.probe_every_s = probe_every_s
        self.state = "connecting"
        self.tools: list[types.Tool] = []
        self.last_error: str | None = None
        self.attempts = 0  # failed attempts since the last connection
        self.connected_at: float | None = None
        self._client: Client | None = None
        self._lost = asyncio.Event()
        self._http_refusal: str | None = None  # the last 4xx/5xx answer, for the status

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "url": self.spec.url,
            "state": self.state,
            "tools": [tool.name for tool in self.tools] if self.state == "connected" else [],
            "last_error": self.last_error,
            "failed_attempts": self.attempts,
            "connected_since": None
            if self.connected_at is None
            else datetime.fromtimestamp(self.connected_at, UTC).isoformat(timespec="seconds"),
        }

    async def run(self) -> None:
        while True:
            try:
                await self._connected_session()
            except asyncio.CancelledError:
                self.state = "stopped"
                raise
            except Exception as err:
                self.last_error = _describe(err)
                if self._http_refusal is not None:
                    self.last_error = f"{self._http_refusal} ({self.last_error})"
            self._client = None
            self.connected_at = None
            self.attempts += 1
            self.state = "disconnected"
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(self.attempts - 1, 8))
            log.info(
                "mcp: server %s (%s) unreachable: %s; next attempt in %.1f s",
                self.spec.name,
                self.spec.url,
                self.last_error,
                delay,
            )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            self.state = "connecting"

    async def _connected_session(self) -> None:
        headers = self.spec.request_headers()
        self._http_refusal = None
        async with create_mcp_http_client(headers=headers) as http:
            http.event_hooks = {"response": [self._note_refusal]}
            async with Client(
                streamable_http_client(self.spec.url, http_client=http), cache=None
            ) as client:
                await self._serve(client)

    async def _note_refusal(self, response: Any) -> None:
        if response.status_code >= 400:
            hint = (
                " (check its token_file or headers)" if response.status_code in (401, 403) else ""
            )
            self._http_refusal = f"HTTP {response.status_code} from the server{hint}"

    async def _serve(self, client: Client) -> None:
        listing = await asyncio.wait_for(client.list_tools(), CALL_TIMEOUT_S)
        self.tools = list(listing.tools)
        self._client = client
        self._lost.clear()
        self.state = "connected"
        self.attempts = 0
        self.connected_at = time.time()
        log.info(
            "mcp: connected to server %s (%s), %d tools",
            self.spec.name,
            self.spec.url,
            len(self.tools),
        )
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self.probe_every_s)
            if self._lost.is_set():
                raise ConnectionError(self.last_error or "connection lost")
            listing = await asyncio.wait_for(client.list_tools(), CALL_TIMEOUT_S)
            self.tools = list(listing.tools)

    async def call(self, tool: str, arguments: Mapping[str, Any] | None) -> Any:
        """The tool's result: its structured content, else its text; ToolError when the
        server is not connected, cannot be reached, or answers with an error result."""
        client = self._client
        if client is None or self.state != "connected":
            raise ToolError(
                f"MCP server {self.spec.name!r} is not connected ({self.state}"
                f"{': ' + self.last_error if self.last_error else ''})"
            )
        try:
            result = await asyncio.wait_for(
                client.call_tool(tool, dict(arguments or {})), CALL_TIMEOUT_S
            )
        except Exception as err:
            message = _describe(err)
            if not _is_protocol_error(err):  # the connection failed: reconnect
                self.last_error = message
                self._lost.set()
            raise ToolError(f"{self.spec.name}.{tool}: {message}") from None
        text = "\n".join(
            block.text for block in result.content if isinstance(block, types.TextContent)
        )
        if result.is_error:
            raise ToolError(f"{self.spec.name}.{tool}: {text or 'failed'}")
        if result.structured_content is not None:
            return result.structured_content
        return text


_LINKS: weakref.WeakKeyDictionary[asyncio.Task[Any], McpServerLink] = weakref.WeakKeyDictionary()


class McpClientMixin:
    """Mix into an `Agent` subclass (before `Agent`) to use MCP servers' tools."""

    # How often an agent with MCP servers is woken (an interval schedule) so that its
    # connections are re-established after a restart without waiting for a message.
    mcp_keepalive_every_s: ClassVar[float] = 30.0
    # How often each connection checks that its server answers (and refreshes its tools).
    mcp_probe_every_s: ClassVar[float] = 15.0

    _gw_host: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own `on_start` first restores the connections."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("on_start")
        if own is None or getattr(own, "__gw_mcp_restores__", False):
            return
        on_start: Any
        if inspect.iscoroutinefunction(own):

            async def restoring_async(self: Any) -> Any:
                self._mcp_restore()
                return await own(self)

            on_start = restoring_async
        else:

            def restoring(self: Any) -> Any:
                self._mcp_restore()
                return own(self)

            on_start = restoring
        on_start.__gw_mcp_restores__ = True
        on_start.__doc__ = own.__doc__
        cls.on_start = on_start  # type: ignore[method-assign]

    def on_start(self) -> Any:
        self._mcp_restore()
        return super().on_start()  # type: ignore[misc]

    # -- public API (in a turn) ------------------------------------------------------------

    async def add_mcp_server(
        self,
        name: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        token_file: str | None = None,
    ) -> dict[str, Any]:
        """Remember the MCP server `name` at `url` and connect to it once this turn has
        committed (replacing a server of that name). Returns its status (connecting at
        first: see `mcp_servers()`)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"MCP server name {name!r}: 1-32 letters, digits, '_' or '-', starting with a "
                "letter (it prefixes its tools' names)"
            )
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {name}: url must be an http(s) URL, got {url!r}")
        clean_headers = {str(k): str(v) for k, v in (headers or {}).items()}
        spec = McpServerSpec(name, url, clean_headers, token_file)
        self.sql(_TABLE)  # type: ignore[attr-defined]
        self.sql(  # type: ignore[attr-defined]
            "INSERT OR REPLACE INTO _gw_mcp_servers (name, url, headers, token_file, added_at) "
            "VALUES (?, ?, ?, ?, ?)",
            name,
            url,
            json.dumps(clean_headers),
            token_file,
            time.time(),
        )
        self._mcp_stop(name)
        self.schedule_every(self.mcp_keepalive_every_s, "mcp_keepalive")  # type: ignore[attr-defined]
        # Connect in a turn of its own, after this one committed (a rolled-back add connects
        # nothing); were the mailbox full, the keep-alive schedule connects it instead.
        queued = self._gw_host.submit(lambda agent: agent._mcp_restore())
        queued.add_done_callback(lambda done: done.cancelled() or done.exception())
        return McpServerLink(spec).status()

    def remove_mcp_server(self, name: str) -> bool:
        """Forget the server `name` and close its connection; False if there was none."""
        if not self._mcp_has_table():
            return False
        removed = bool(self.sql("DELETE FROM _gw_mcp_servers WHERE name = ? RETURNING name", name))  # type: ignore[attr-defined]
        self._mcp_stop(name)
        if not self.sql("SELECT name FROM _gw_mcp_servers LIMIT 1"):  # type: ignore[attr-defined]
            for schedule in self.get_schedules(method="mcp_keepalive"):  # type: ignore[attr-defined]
                self.cancel_schedule(schedule.id)  # type: ignore[attr-defined]
        return removed

    def mcp_servers(self) -> dict[str, dict[str, Any]]:
        """Each configured server's status: state (connecting, connected, disconnected,
        stopped), its tools, the last error and failed attempts since it last connected."""
        statuses = {}
        for spec in self._mcp_specs():
            link = self._mcp_link(spec.name)
            statuses[spec.name] = (
                link.status()
                if link is not None
                else {"name": spec.name, "url": spec.url, "state": "stopped", "tools": []}
            )
        return statuses

    def mcp_tools(self) -> list[Tool]:
        """The tools of every connected server, as `Tool`s named `<server>_<tool>` whose
        calls go to that server."""
        tools = []
        for spec in self._mcp_specs():
            link = self._mcp_link(spec.name)
            if link is None or link.state != "connected":
                continue
            for remote in link.tools:
                tools.append(_as_tool(link, remote))
        return tools

    async def call_mcp_tool(
        self, server: str, tool: str, arguments: Mapping[str, Any] | None = None
    ) -> Any:
        """Call `tool` on the MCP server `server`; ToolError says why it failed."""
        link = self._mcp_link(server)
        if link is None:
            raise ToolError(f"no MCP server {server!r} (add_mcp_server first)")
        return await link.call(tool, arguments)

    def mcp_keepalive(self, payload: Any = None) -> None:
        """Scheduled: restore the connections (after a restart the schedule wakes the agent)."""
        self._mcp_restore()

    # -- internals -------------------------------------------------------------------------

    def _mcp_has_table(self) -> bool:
        return bool(
            self.sql(  # type: ignore[attr-defined]
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_gw_mcp_servers'"
            )
        )

    def _mcp_specs(self) -> list[McpServerSpec]:
        if not self._mcp_has_table():
            return []
        rows = self.sql("SELECT name, url, headers, token_file FROM _gw_mcp_servers ORDER BY name")  # type: ignore[attr-defined]
        return [
            McpServerSpec(row["name"], row["url"], json.loads(row["headers"]), row["token_file"])
            for row in rows
        ]

    def _mcp_restore(self) -> None:
        for spec in self._mcp_specs():
            if self._mcp_link(spec.name) is None:
                self._mcp_start(spec)

    def _mcp_link(self, name: str) -> McpServerLink | None:
        task = self._gw_host.running_task(_TASK_PREFIX + name)
        return None if task is None else _LINKS.get(task)

    def _mcp_start(self, spec: McpServerSpec) -> McpServerLink:
        link = McpServerLink(spec, probe_every_s=self.mcp_probe_every_s)
        task = self._gw_host.start_task(_TASK_PREFIX + spec.name, link.run())
        _LINKS[task] = link
        return link

    def _mcp_stop(self, name: str) -> None:
        task = self._gw_host.running_task(_TASK_PREFIX + name)
        if task is not None:
            task.cancel()


def _as_tool(link: McpServerLink, remote: types.Tool) -> Tool:
    name = _TOOL_CHARS.sub("_", f"{link.spec.name}_{remote.name}")[:64]
    schema = dict(remote.input_schema or {})
    if schema.get("type") != "object":
        schema = {"type": "object", "properties": {}}
    annotations = remote.annotations
    remote_name = remote.name

    async def call(**arguments: Any) -> Any:
        return await link.call(remote_name, arguments)

    return Tool(
        name=name,
        description=remote.description or f"{remote_name} on MCP server {link.spec.name}",
        parameters=schema,
        fn=call,
        read_only=bool(annotations is not None and annotations.read_only_hint),
    )


def _is_protocol_error(err: BaseException) -> bool:
    from mcp.shared.exceptions import MCPError

    return isinstance(err, MCPError)


def _describe(err: BaseException) -> str:
    if isinstance(err, BaseExceptionGroup) and err.exceptions:
        return _describe(err.exceptions[0])
    if isinstance(err, TimeoutError):
        return "timed out"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
