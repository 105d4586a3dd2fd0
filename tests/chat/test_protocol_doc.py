"""PROTOCOL.md's chat example exchange, replayed against a real chat agent over WebSocket."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gatewayd.chat import ChatAgent, EchoBackend
from tests.test_docs import ANY, matches

PROTOCOL = Path(__file__).resolve().parents[2] / "protocols" / "PROTOCOL.md"


class Echo(ChatAgent):
    backend = EchoBackend()


def chat_example() -> list[tuple[str, dict[str, Any]]]:
    text = PROTOCOL.read_text(encoding="utf-8")
    block = text[text.index("Chat example:") : text.index("(The agent above")]
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
