"""`ChatClient` and tool calls (protocols/PROTOCOL.md "Tools, client tools and approvals"):
an answer pauses on a call that needs approval, the client approves it, and the continuation
streams to the response `approve` returned; a client tool is answered with `tool_result`."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.chat import ChatAgent, ScriptedBackend
from gatewayd.client import ChatClient
from gatewayd.tools import tool_from_function
from protocols.ws import WsListener, WsSettings
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(
    "replies" not in inspect.signature(ScriptedBackend).parameters,
    reason="needs the chat tool loop (gw.chat.tool_approval, gw.chat.tool_result)",
)
WAIT_S = 10.0


def call(call_id: str, name: str, **args: Any) -> dict[str, Any]:
    return {"type": "tool-call", "toolCallId": call_id, "toolName": name, "input": args}


def say(text: str) -> dict[str, Any]:
    return {"type": "text-delta", "id": "t0", "delta": text}


def set_temperature(room: str, celsius: float) -> str:
    """Set a room's target temperature."""
    return f"room {room} set to {celsius}"


class Site(ChatAgent):
    backend: ClassVar[Any] = ScriptedBackend([])
    tools = (tool_from_function(set_temperature, needs_approval=True),)


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path / "state"), {"site": Site})
    await runtime.start()
    listener = WsListener(WsSettings(port=0), runtime)
    await listener.start()
    try:
        yield f"ws://127.0.0.1:{listener.bound_port}"
    finally:
        await listener.stop()
        await runtime.close()


async def test_approving_a_call_streams_the_continuation(url: str) -> None:
    Site.backend = ScriptedBackend(
        replies=[[call("c1", "set_temperature", room="2", celsius=21)], [say("Done.")]]
    )
    async with ChatClient(url, "site", "s1") as chat:
        first = await chat.send("set room 2 to 21")
        assert await first.wait() == "complete"
        assert first.waiting == [
            {"toolCallId": "c1", "toolName": "set_temperature", "kind": "approval"}
        ]
        assert first.tool_calls["c1"]["state"] == "tool-approval-request"

        continued = await chat.approve("c1")
        assert await continued.wait() == "complete"
        assert continued.tool_calls["c1"]["output"] == "room 2 set to 21.0"
        assert continued.text == "Done."
        # The continuation extends the paused message (its start chunk names it).
        assert continued.message_id == first.message_id is not None

        def stored() -> bool:
            parts = chat.messages[-1]["parts"]
            return any(p["type"] == "tool" and p["state"] == "output-available" for p in parts)

        await wait_until(stored, WAIT_S, "the tool part stored as output-available")
        assert chat.messages[-1]["id"] == first.message_id


async def test_a_client_tool_is_answered_with_tool_result(url: str) -> None:
    Site.backend = ScriptedBackend(replies=[[call("k1", "where_am_i")], [say("You are home.")]])
    async with ChatClient(url, "site", "s2") as chat:
        first = await chat.send(
            "where am I?", client_tools=[{"name": "where_am_i", "description": "the location"}]
        )
        await first.wait()
        assert first.waiting and first.waiting[0]["kind"] == "client"
        continued = await chat.tool_result("k1", {"place": "home"})
        assert await continued.wait() == "complete"
        assert continued.text == "You are home."
