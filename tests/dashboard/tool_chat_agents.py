"""An agent class for the dashboard's chat test, run inside the test daemon: a chat agent
whose (scripted) model asks for a tool that needs a person's approval, then answers."""

from __future__ import annotations

from typing import Any, ClassVar

from gatewayd.chat import ChatAgent, ScriptedBackend
from gatewayd.tools import tool_from_function


def set_temperature(room: str, celsius: float) -> str:
    """Set a room's target temperature."""
    return f"room {room} set to {celsius}"


def _call(room: str, celsius: float) -> dict[str, Any]:
    return {
        "type": "tool-call",
        "toolCallId": "c1",
        "toolName": "set_temperature",
        "input": {"room": room, "celsius": celsius},
    }


class Site(ChatAgent):
    backend: ClassVar[Any] = ScriptedBackend(
        replies=[[_call("2", 21.0)], [{"type": "text-delta", "id": "t0", "delta": "Done: 21 °C."}]]
    )
    tools = (tool_from_function(set_temperature, needs_approval=True),)
