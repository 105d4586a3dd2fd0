"""PROTOCOL.md's chat example exchange, replayed against a real chat agent over WebSocket."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gatewayd.chat import ChatAgent, EchoBackend, ScriptedBackend
from gatewayd.tools import tool_from_function
from tests.test_docs import ANY, matches

PROTOCOL = Path(__file__).resolve().parents[2] / "protocols" / "PROTOCOL.md"


class Echo(ChatAgent):
    backend = EchoBackend()


def chat_example(
    start: str = "Chat example:", end: str = "(The agent above"
) -> list[tuple[str, dict[str, Any]]]:
    text = PROTOCOL.read_text(encoding="utf-8")
    block = text[text.index(start) : text.index(end)]
    return [
        (direction, json.loads(body.replace(":..", f':"{ANY}"')))
        for direction, body in re.findall(r"^\s+(->|<-) (\{.*\})", block, re.M)
    ]


async def test_the_documented_chat_exchange_is_what_the_gateway_does(serve):
    example = chat_example()
    assert len(example) >= 8
    async with serve({"echo": Echo}) as served, served.client("echo", "doc") as client:
        for direction, frame in example:
            if direction == "->":
                await client.ws.send(json.dumps(frame))
            else:
                real = await client.next_frame()
                assert matches(frame, real), (frame, real)


def read_temperature(room: str) -> float:
    """The temperature of a room."""
    return 19.5


def set_temperature(room: str, celsius: float) -> str:
    """Set a room's target temperature."""
    return f"room {room} set to {celsius}"


class Heating(ChatAgent):
    tools = (
        tool_from_function(read_temperature),
        tool_from_function(set_temperature, needs_approval=True),
    )
    backend = ScriptedBackend(
        replies=[
            [{"type": "tool-call", "toolCallId": "c1", "toolName": "read_temperature",
              "input": {"room": "2"}}],
            [{"type": "tool-call", "toolCallId": "c2", "toolName": "set_temperature",
              "input": {"room": "2", "celsius": 21}}],
            [{"type": "text-delta", "id": "t0", "delta": "Done."}],
        ]
    )  # fmt: skip


async def test_the_documented_tool_exchange_is_what_the_gateway_does(serve):
    example = chat_example("Tool example", "(End of the tool example.)")
    assert len(example) >= 14
    async with serve({"heating": Heating}) as served, served.client("heating", "doc") as client:
        for direction, frame in example:
            if direction == "->":
                await client.ws.send(json.dumps(frame))
            else:
                real = await client.next_frame()
                assert matches(frame, real), (frame, real)
