"""Agents as MCP clients, against the SDK's own server started in the test: the server is
remembered in the agent's database, its tools are the agent's (namespaced), its errors come
back as ToolErrors, and the connection comes back after the server went away and after the
gateway restarted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from gatewayd.mcp.client import McpClientMixin
from tests.agents.conftest import MemoryLink
from tests.mcp.polling import eventually
from tests.mcp.remote import RemoteMcpServer
from tests.waiting import wait_until

SECRET = "remote-secret-0123456789"


class Assistant(McpClientMixin, Agent):
    mcp_keepalive_every_s = 0.5
    mcp_probe_every_s = 0.2
    started = 0

    def on_start(self) -> None:
        Assistant.started += 1

    @callable
    async def connect(self, name: str, url: str, token_file: str) -> dict[str, Any]:
        return await self.add_mcp_server(name, url, token_file=token_file)

    @callable
    async def connect_then_fail(self, name: str, url: str, token_file: str) -> None:
        await self.add_mcp_server(name, url, token_file=token_file)
        raise RuntimeError("changed my mind")

    @callable
    def disconnect(self, name: str) -> bool:
        return self.remove_mcp_server(name)

    @callable
    def servers(self) -> dict[str, Any]:
        return self.mcp_servers()

    @callable
    def tool_names(self) -> list[str]:
        return sorted(tool.name for tool in self.mcp_tools())

    @callable
    async def use(self, name: str, arguments: dict[str, Any]) -> Any:
        (tool,) = [tool for tool in self.mcp_tools() if tool.name == name]
        return await tool.invoke(arguments)

    @callable
    async def use_directly(self, server: str, tool: str, arguments: dict[str, Any]) -> Any:
        return await self.call_mcp_tool(server, tool, arguments)


def settings(state_dir: Path) -> AgentSettings:
    return AgentSettings(state_dir=state_dir, hibernate_after_s=60)


@pytest.fixture
async def remote() -> AsyncIterator[RemoteMcpServer]:
    server = RemoteMcpServer(SECRET)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def weather_status(runtime: AgentRuntime, wanted: str) -> dict[str, Any]:
    async def status() -> dict[str, Any]:
        servers = await runtime.call("assistant", "a1", "servers")
        return dict(servers.get("weather", {"state": "absent"}))

    return dict(await eventually(status, lambda s: s["state"] == wanted, 20, f"weather {wanted}"))


async def test_agent_uses_a_remote_mcp_servers_tools_across_outages_and_restarts(
    tmp_path: Path, remote: RemoteMcpServer
) -> None:
    token_file = tmp_path / "weather.token"
    token_file.write_text(SECRET + "\n")
    state_dir = tmp_path / "state"
    runtime = AgentRuntime(settings(state_dir), {"assistant": Assistant})
    await runtime.start()
    device = MemoryLink("assistant", "a1", transport="mqtt")  # takes no protocol messages
    await runtime.open_link(device, {})
    try:
        first = await runtime.call(
            "assistant", "a1", "connect", "weather", remote.url, str(token_file)
        )
        assert first["state"] == "connecting"
        status = await weather_status(runtime, "connected")
        assert status["tools"] == ["temperature", "fail"] and status["failed_attempts"] == 0

        assert await runtime.call("assistant", "a1", "tool_names") == [
            "weather_fail",
            "weather_temperature",
        ]
        # Hibernation drops the agent instance, not its connection: the wake finds it running.
        assert runtime.hibernate_idle() == 1 and not runtime.is_awake("assistant", "a1")
        assert (await weather_status(runtime, "connected"))["connected_since"] == status[
            "connected_since"
        ]
        assert len([t for t in runtime._agent_tasks[("assistant", "a1")]]) == 1
        assert await runtime.call(
            "assistant", "a1", "use", "weather_temperature", {"city": "Oslo"}
        ) == {"city": "Oslo", "celsius": 21.5}
        with pytest.raises(Exception, match=r"weather\.fail: .*the sensor is down"):
            await runtime.call(
                "assistant",
                "a1",
                "use_directly",
                "weather",
                "fail",
                {"reason": "the sensor is down"},
            )

        await remote.stop()  # the server goes away
        gone = await weather_status(runtime, "disconnected")
        assert gone["last_error"] and gone["tools"] == []
        with pytest.raises(Exception, match="'weather' is not connected"):
            await runtime.call(
                "assistant", "a1", "use_directly", "weather", "temperature", {"city": "Oslo"}
            )

        await remote.start()  # ... and comes back at the same address
        await weather_status(runtime, "connected")
        assert await runtime.call(
            "assistant", "a1", "use_directly", "weather", "temperature", {"city": "Rome"}
        ) == {"city": "Rome", "celsius": 21.5}
        # Connecting, probing, failing and reconnecting sent the device nothing.
        assert device.sent == [] and device.closed is None
    finally:
        await runtime.close()

    # A restart: no message reaches the agent, yet its keep-alive schedule wakes it and the
    # connection is re-established from what its database remembers.
    remote.requests.clear()
    Assistant.started = 0
    runtime = AgentRuntime(settings(state_dir), {"assistant": Assistant})
    await runtime.start()
    try:
        await wait_until(lambda: "POST" in remote.requests, 20, "the agent to reconnect by itself")
        assert Assistant.started == 1
        await weather_status(runtime, "connected")
        assert await runtime.call("assistant", "a1", "disconnect", "weather") is True
        assert await runtime.call("assistant", "a1", "servers") == {}
        assert not await runtime.call("assistant", "a1", "tool_names")
        await wait_until(
            lambda: not runtime._agent_tasks.get(("assistant", "a1")), 5, "the link task to end"
        )
    finally:
        await runtime.close()


async def test_a_refused_token_shows_in_the_servers_status(
    tmp_path: Path, remote: RemoteMcpServer
) -> None:
    token_file = tmp_path / "wrong.token"
    token_file.write_text("not-the-secret-at-all")
    runtime = AgentRuntime(settings(tmp_path / "state"), {"assistant": Assistant})
    await runtime.start()
    try:
        await runtime.call("assistant", "a1", "connect", "weather", remote.url, str(token_file))
        refused = await eventually(
            lambda: runtime.call("assistant", "a1", "servers"),
            lambda s: s["weather"]["failed_attempts"] >= 2,
            20,
            "two refused attempts",
        )
        assert refused["weather"]["state"] in ("disconnected", "connecting")
        assert "401" in refused["weather"]["last_error"]
        # An add in a turn that rolls back is not remembered and connects nothing.
        with pytest.raises(RuntimeError, match="changed my mind"):
            await runtime.call(
                "assistant", "a1", "connect_then_fail", "other", remote.url, str(token_file)
            )
        assert list(await runtime.call("assistant", "a1", "servers")) == ["weather"]
        assert list(runtime._agent_tasks[("assistant", "a1")]) == ["mcp-server:weather"]
        with pytest.raises(ValueError, match="MCP server name 'no spaces'"):
            await runtime.call(
                "assistant", "a1", "connect", "no spaces", remote.url, str(token_file)
            )
    finally:
        await runtime.close()
