"""A chat agent that is also an MCP client, in Code Mode: its program calls the tools of an
MCP server (the SDK's own, started here, over real HTTP) beside the agent's own tool. Real
WebSocket client, runtime, SQLite and sandbox workers; the model is scripted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from gatewayd.agents import callable
from gatewayd.chat import ChatAgent, ScriptedBackend
from gatewayd.codemode import CodeExecutor, Limits
from gatewayd.mcp.client import McpClientMixin
from gatewayd.tools import Tool, tool
from tests.chat.conftest import user
from tests.chat.test_code_mode import code_call, say, tool_parts
from tests.mcp.polling import eventually
from tests.mcp.remote import RemoteMcpServer

pytestmark = pytest.mark.timeout(90)

SECRET = "chat-codemode-secret-0123456789"
PROGRAM = """async () => {
  const oslo = await codemode.weather_temperature({ city: "Oslo" });
  const label = await codemode.label({ celsius: oslo.celsius });
  return { oslo, label };
}"""


class WeatherChat(McpClientMixin, ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])
    code_mode = True

    def chat_tools(self) -> list[Tool]:
        return [*super().chat_tools(), *self.mcp_tools()]

    @callable
    async def connect(self, url: str, token_file: str) -> dict[str, Any]:
        return await self.add_mcp_server("weather", url, token_file=token_file)

    @callable
    def state_of(self) -> str:
        return str(self.mcp_servers().get("weather", {}).get("state", "absent"))

    @tool(read_only=True)
    def label(self, celsius: float) -> str:
        """Say whether a temperature is warm.

        Args:
            celsius: The temperature, in °C.
        """
        return "warm" if celsius >= 20 else "cold"


async def test_a_chat_program_calls_mcp_tools_and_the_agents_own(serve, tmp_path: Path) -> None:
    token_file = tmp_path / "weather.token"
    token_file.write_text(SECRET + "\n")
    remote = RemoteMcpServer(SECRET)
    await remote.start()
    try:
        async with CodeExecutor(Limits(wall_time_s=20.0), workers=1) as executor:
            WeatherChat.code_executor = executor
            WeatherChat.backend = ScriptedBackend(
                replies=[[code_call("c1", PROGRAM)], [say("It is warm in Oslo.")]]
            )
            async with serve({"chat": WeatherChat}) as served:
                await served.runtime.call("chat", "w1", "connect", remote.url, str(token_file))

                async def state() -> str:
                    return str(await served.runtime.call("chat", "w1", "state_of"))

                await eventually(state, lambda s: s == "connected", 20, "the MCP server connected")
                async with served.client("chat", "w1") as a:
                    await a.send("gw.chat.send", id="r1", messages=[user("u1", "Oslo?")])
                    frames = await a.until_type("gw.chat.done")
                    assert frames[-1]["status"] == "complete"
                    stored = (await a.messages())[-1]
            offered = WeatherChat.backend.tools[0]
            assert [t["function"]["name"] for t in offered] == ["code"]
            description = offered[0]["function"]["description"]
            assert "weather_temperature(input" in description and "label(input" in description
            [code] = tool_parts(stored)
            result = code["output"]["result"]
            assert "21.5" in str(result["oslo"]) and "Oslo" in str(result["oslo"])
            assert result["label"] == "warm", result
    finally:
        WeatherChat.code_executor = None
        await remote.stop()
