"""Code Mode over an MCP server's tools: an agent connected to the SDK's own server (started
here) runs one program whose `codemode.<server>_<tool>` calls go to that server; the JSON
schemas the server published are checked on the host before any call leaves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from gatewayd.codemode import CodeExecutor, render_api
from gatewayd.mcp.client import McpClientMixin
from tests.mcp.polling import eventually
from tests.mcp.remote import RemoteMcpServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "codemode-secret-0123456789"
EXECUTORS: dict[str, CodeExecutor] = {}


class Coder(McpClientMixin, Agent):
    @callable
    async def connect(self, url: str, token_file: str) -> dict[str, Any]:
        return await self.add_mcp_server("weather", url, token_file=token_file)

    @callable
    def state_of(self) -> str:
        return str(self.mcp_servers().get("weather", {}).get("state", "absent"))

    @callable
    def api(self) -> str:
        return render_api(self.mcp_tools())

    @callable
    async def run_program(self, program: str) -> dict[str, Any]:
        result = await EXECUTORS["current"].run(program, self.mcp_tools())
        return result.for_model()


@pytest_asyncio.fixture(loop_scope="module")  # the same loop as the test and the executor
async def remote() -> AsyncIterator[RemoteMcpServer]:
    server = RemoteMcpServer(SECRET)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_program_calls_a_remote_mcp_servers_tools(
    tmp_path: Path, remote: RemoteMcpServer, executor: CodeExecutor
) -> None:
    EXECUTORS["current"] = executor
    token_file = tmp_path / "weather.token"
    token_file.write_text(SECRET + "\n")
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path / "state"), {"coder": Coder})
    await runtime.start()
    try:
        await runtime.call("coder", "c1", "connect", remote.url, str(token_file))

        async def state() -> str:
            return str(await runtime.call("coder", "c1", "state_of"))

        await eventually(state, lambda s: s == "connected", 20, "the MCP server connected")
        api = await runtime.call("coder", "c1", "api")
        assert "weather_temperature(input: {\n    city: string;\n  })" in api
        shown = await runtime.call(
            "coder",
            "c1",
            "run_program",
            "async () => {"
            "  const oslo = await codemode.weather_temperature({city: 'Oslo'});"
            "  const errors = [];"
            "  try { await codemode.weather_fail({reason: 'sensor offline'}) }"
            "  catch (e) { errors.push(e.message) }"
            "  try { await codemode.weather_temperature({town: 'Oslo'}) }"
            "  catch (e) { errors.push(e.message) }"
            "  return {oslo, errors};"
            "}",
        )
    finally:
        await runtime.drain(5)
        await runtime.close()
    assert "error" not in shown, shown
    oslo, errors = shown["result"]["oslo"], shown["result"]["errors"]
    assert "21.5" in str(oslo) and "Oslo" in str(oslo)
    assert "sensor offline" in errors[0]
    assert errors[1].startswith("weather_temperature: invalid arguments: input: 'city'")
