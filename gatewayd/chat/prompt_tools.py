"""Tool calls for models without a native tool-call format: described in the prompt, parsed
from the text.

    chat = prompt_messages(messages, system, tools)      # role/content messages
    parser = ToolCallParser()
    for chunk in parser.feed(text):  ...                  # text-delta / tool-call chunks
    for chunk in parser.flush(): ...

The system prompt lists the tools (name, description, JSON schema) and asks for a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; earlier calls are shown to the
model the same way and their results as `<tool_result>` user turns (chat templates of small
models know only system/user/assistant). The parser streams the text through, holding back
only what could be the start of a `<tool_call>` tag; a call without its closing tag at the end
(the closing tag is a stop string) is still a call when its JSON parses. Pure: no I/O.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from gatewayd.chat.messages import Chunk, Message, text_of

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
STOP = (CLOSE,)

INSTRUCTIONS = (
    "You can call these tools (JSON schemas of their arguments):\n{tools}\n\n"
    "To call a tool, answer with exactly one line and nothing else:\n"
    '<tool_call>{{"name": "<tool name>", "arguments": {{<arguments>}}}}</tool_call>\n'
    "The result comes back as <tool_result>. Without a tool, answer normally."
)


def describe_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for spec in tools:
        function = spec.get("function", spec)
        lines.append(
            json.dumps(
                {
                    "name": function.get("name"),
                    "description": function.get("description"),
                    "parameters": function.get("parameters"),
                },
                ensure_ascii=False,
            )
        )
    return "\n".join(lines)


def prompt_messages(
    messages: Sequence[Message], system: str | None, tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, str]]:
    """UI messages -> role/content messages with the tools in the system prompt and tool
    calls and results as text."""
    from gatewayd.chat.backends import tool_result_of  # (backends imports this module)

    system_parts = [system] if system else []
    if tools:
        system_parts.append(INSTRUCTIONS.format(tools=describe_tools(tools)))
    out: list[dict[str, str]] = []
    if system_parts:
        out.append({"role": "system", "content": "\n\n".join(system_parts)})
    for message in messages:
        role = str(message.get("role"))
        if role != "assistant":
            out.append({"role": role, "content": text_of(message)})
            continue
        text = ""
        for part in message.get("parts", ()):
            if part.get("type") == "text":
                text += str(part.get("text", ""))
            elif part.get("type") == "tool":
                call = {"name": part.get("toolName"), "arguments": part.get("input") or {}}
                text += OPEN + json.dumps(call, ensure_ascii=False) + CLOSE
                out.append({"role": "assistant", "content": text})
                result = json.dumps(tool_result_of(part), ensure_ascii=False)
                out.append({"role": "user", "content": f"<tool_result>{result}</tool_result>"})
                text = ""
        if text:
            out.append({"role": "assistant", "content": text})
    return out


class ToolCallParser:
    """Text deltas in, chunks out (see the module docstring)."""

    def __init__(self, text_id: str = "t0") -> None:
        self.text_id = text_id
        self._pending = ""
        self._in_call = False

    def feed(self, text: str) -> list[Chunk]:
        self._pending += text
        chunks: list[Chunk] = []
        while True:
            if self._in_call:
                end = self._pending.find(CLOSE)
                if end < 0:
                    return chunks
                chunks.append(self._call(self._pending[:end]))
                self._pending = self._pending[end + len(CLOSE) :]
                self._in_call = False
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                self._text(chunks, self._pending[:start])
                self._pending = self._pending[start + len(OPEN) :]
                self._in_call = True
                continue
            keep = _partial_tag_length(self._pending)
            self._text(chunks, self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            return chunks

    def flush(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        if self._in_call:
            chunks.append(self._call(self._pending))
        else:
            self._text(chunks, self._pending)
        self._pending, self._in_call = "", False
        return chunks

    def _text(self, chunks: list[Chunk], text: str) -> None:
        if text:
            chunks.append({"type": "text-delta", "id": self.text_id, "delta": text})

    def _call(self, body: str) -> Chunk:
        try:
            call = json.loads(body.strip())
        except ValueError:
            call = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            # Not a call after all: what the model wrote stays text.
            return {"type": "text-delta", "id": self.text_id, "delta": OPEN + body}
        arguments = call.get("arguments")
        if not isinstance(arguments, dict):
            arguments = {} if arguments is None else {"_unparsed": arguments}
        return {
            "type": "tool-call",
            "toolCallId": f"call_{uuid.uuid4().hex[:12]}",
            "toolName": call["name"],
            "input": arguments,
        }


def _partial_tag_length(text: str) -> int:
    """How many trailing characters of `text` could begin `<tool_call>`."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0
