"""The example chat agent: `ws://HOST:PORT/agents/chat/{id}` (frames: protocols/PROTOCOL.md).

`SiteChat` manages the example thermostat `room2` (its `@callable` methods are its tools) and
asks a person before it changes anything. Its model is `DemoModel`, which is NOT a model: it
calls the thermostat tool when a message says "set room 2 to 21", and echoes anything else,
so the example (and its approval) runs anywhere. Give it a real model in the TOML config:

    [chat.backends.local]
    kind = "local"
    generator = "smollm2"          # a [generators.NAME] of this gateway

    [chat.agents.chat]
    backend = "local"
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from gatewayd.chat import AgentDevice, ChatAgent, EchoBackend
from gatewayd.chat.messages import Chunk, Message, text_of

_SET = re.compile(r"set room 2 to (-?\d+(?:\.\d+)?)", re.I)


class DemoModel:
    """A stand-in for a model (examples and docs only): see the module docstring."""

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Chunk]:
        last = messages[-1] if messages else {}
        if last.get("role") == "assistant":  # a tool call was answered: say how it went
            part = [p for p in last.get("parts", ()) if p.get("type") == "tool"][-1]
            if part.get("state") == "output-available":
                text = f"Room 2 is now set to {part['output']} °C."
            elif part.get("state") == "output-denied":
                text = "OK, I left room 2 as it is."
            else:
                text = f"That did not work: {part.get('errorText')}"
            yield {"type": "text-delta", "id": "t0", "delta": text}
            return
        match = _SET.search(text_of(last))
        if match:
            yield {
                "type": "tool-call",
                "toolCallId": "",  # the chat gives it an id
                "toolName": "thermostat_room2_set_target",
                "input": {"target": float(match.group(1))},
            }
            return
        async for chunk in EchoBackend().stream(messages):
            yield chunk


class SiteChat(ChatAgent):
    system_prompt = "You are the assistant of this site's gateway. Answer briefly."
    backend = DemoModel()
    devices = (AgentDevice("thermostat", "room2", needs_approval=True),)
    max_persisted_messages = 1000


class EchoChat(ChatAgent):
    """Answers with the last user message, word by word (no tools)."""

    backend = EchoBackend()
