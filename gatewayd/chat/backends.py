"""Model backends: what turns a conversation into a stream of chunks (messages.py shapes).

    backend = OpenAICompatibleBackend(base_url="http://127.0.0.1:8000/v1", model="qwen")
    async for chunk in backend.stream(messages, system="You are a thermostat."):
        ...

- `OpenAICompatibleBackend`: any OpenAI-compatible server (vLLM, llama.cpp server, a cloud
  API) through the official `openai` package (`pip install 'gatewayd[openai]'`), streaming.
  Native tool calls are mapped to `tool-call` chunks; `tool_calls="prompt"` describes the
  tools in the prompt instead, for servers whose model has no tool-call format.
- `ScriptedBackend`: a test double of the model (not of gatewayd): replays fixed chunks,
  optionally waiting on events between them, so tests pace a stream without sleeping.
- `EchoBackend`: for the example and tests only: answers with the last user text, word by word.

The local generation engine (engine/generate) is `gatewayd.chat.local.LocalBackend`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from gatewayd.chat.messages import Chunk, Message, text_of
from gatewayd.chat.prompt_tools import STOP, ToolCallParser, prompt_messages


class ModelBackend(Protocol):
    def stream(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Chunks of one assistant answer to `messages`. `tools`: OpenAI-style function specs."""
        ...


class ScriptedBackend:
    """Replays `chunks` for every request; before chunk i it waits for `gates[i]` if given.
    With `replies`, request n gets `replies[n]` instead (the last one again once they run
    out): a scripted tool loop (a tool call, then an answer that uses its result)."""

    def __init__(
        self,
        chunks: Sequence[Chunk] = (),
        gates: Mapping[int, asyncio.Event] | None = None,
        *,
        replies: Sequence[Sequence[Chunk]] | None = None,
    ) -> None:
        self.chunks = list(chunks)
        self.gates = dict(gates or {})
        self.replies = [list(r) for r in replies] if replies else None
        self.requests: list[list[Message]] = []  # what the model was given, in full
        self.tools: list[list[dict[str, Any]]] = []  # the tools offered with each request

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Chunk]:
        self.requests.append(copy.deepcopy(list(messages)))
        self.tools.append([dict(t) for t in tools or ()])
        chunks = self.chunks
        if self.replies:
            chunks = self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]
        for i, chunk in enumerate(chunks):
            gate = self.gates.get(i)
            if gate is not None:
                await gate.wait()
            yield dict(chunk)


class EchoBackend:
    """Example/tests only, not a model: answers "echo: <last user text>" one word per chunk."""

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Chunk]:
        last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        words = ("echo: " + (text_of(last) if last else "")).split(" ")
        yield {"type": "start"}
        for i, word in enumerate(words):
            yield {"type": "text-delta", "id": "t0", "delta": word if i == 0 else " " + word}
            await asyncio.sleep(0)  # let other agents' turns interleave
        yield {"type": "finish"}


class OpenAICompatibleBackend:
    """Streams chat completions from an OpenAI-compatible endpoint (see the module docstring).

    `api_key_file`: a file holding the key (the key never goes in the TOML); without a key
    "unused" is sent, which local servers accept."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_file: Path | str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        extra_body: Mapping[str, Any] | None = None,
        tool_calls: str = "native",
    ) -> None:
        if tool_calls not in ("native", "prompt"):
            raise ValueError(f"tool_calls must be 'native' or 'prompt', got {tool_calls!r}")
        self.tool_calls = tool_calls
        try:
            import openai
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "OpenAICompatibleBackend needs the `openai` package: pip install 'gatewayd[openai]'"
            ) from err
        if api_key is None and api_key_file is not None:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        self.model = model
        self.extra_body = dict(extra_body or {})
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unused",
            timeout=timeout_s,
            max_retries=max_retries,
        )

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Chunk]:
        parser = None
        if tools and self.tool_calls == "prompt":  # a server without native tool calls
            parser = ToolCallParser()
            request: dict[str, Any] = {
                "model": self.model,
                "messages": prompt_messages(messages, system, tools),
                "stream": True,
                "stop": list(STOP),
            }
        else:
            request = {
                "model": self.model,
                "messages": to_openai_messages(messages, system),
                "stream": True,
            }
            if tools:
                request["tools"] = list(tools)
        if self.extra_body:
            request["extra_body"] = self.extra_body
        response = await self._client.chat.completions.create(**request)
        calls: dict[int, dict[str, Any]] = {}
        yield {"type": "start"}
        finish_reason = None
        try:
            async for event in response:
                for choice in event.choices:
                    delta = choice.delta
                    reasoning = getattr(delta, "reasoning_content", None)
                    if reasoning:
                        yield {"type": "reasoning-delta", "id": "r0", "delta": reasoning}
                    if delta.content and parser is not None:
                        for chunk in parser.feed(delta.content):
                            yield chunk
                    elif delta.content:
                        yield {"type": "text-delta", "id": "t0", "delta": delta.content}
                    for call in delta.tool_calls or ():
                        slot = calls.setdefault(call.index, {"id": None, "name": "", "args": ""})
                        slot["id"] = call.id or slot["id"]
                        if call.function is not None:
                            slot["name"] += call.function.name or ""
                            slot["args"] += call.function.arguments or ""
                    finish_reason = choice.finish_reason or finish_reason
        finally:
            await response.close()
        for chunk in parser.flush() if parser is not None else ():
            yield chunk
        for _index, call in sorted(calls.items()):
            try:
                arguments = json.loads(call["args"] or "{}")
            except ValueError:
                arguments = {"_unparsed": call["args"]}
            yield {
                "type": "tool-call",
                "toolCallId": call["id"] or f"call_{uuid.uuid4().hex[:12]}",
                "toolName": call["name"],
                "input": arguments,
            }
        yield {"type": "finish", "metadata": {"finishReason": finish_reason}}


def to_openai_messages(messages: Sequence[Message], system: str | None) -> list[dict[str, Any]]:
    """UI messages (parts) -> OpenAI chat messages. An assistant message with tool parts is
    cut into its steps: each step's text and tool calls, then one result per call (a denied,
    failed or unanswered call still gets a result, so the model always sees one)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in messages:
        role = message.get("role")
        parts = message.get("parts", ())
        if role != "assistant" or not any(p.get("type") == "tool" for p in parts):
            out.append({"role": role, "content": text_of(message)})
            continue
        for text, calls in _steps(parts):
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                entry["tool_calls"] = [
                    {
                        "id": p.get("toolCallId"),
                        "type": "function",
                        "function": {
                            "name": p.get("toolName"),
                            "arguments": json.dumps(p.get("input") or {}),
                        },
                    }
                    for p in calls
                ]
            out.append(entry)
            for p in calls:
                content = tool_result_of(p)
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": p.get("toolCallId"),
                        "content": content if isinstance(content, str) else json.dumps(content),
                    }
                )
    return out


def _steps(parts: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """(text, tool parts) per step: a text part after tool parts starts the next step."""
    steps: list[tuple[str, list[Mapping[str, Any]]]] = []
    text, calls = "", list[Mapping[str, Any]]()
    for part in parts:
        if part.get("type") == "text":
            if calls:
                steps.append((text, calls))
                text, calls = "", []
            text += str(part.get("text", ""))
        elif part.get("type") == "tool":
            calls.append(part)
    if text or calls:
        steps.append((text, calls))
    return steps


def tool_result_of(part: Mapping[str, Any]) -> Any:
    """What the model is told a tool call gave."""
    state = part.get("state")
    if state == "output-available":
        return part.get("output")
    if state == "output-denied":
        approval = part.get("approval") or {}
        denied: dict[str, Any] = {"denied": True, "reason": approval.get("reason")}
        return denied
    if state == "output-error":
        return {"error": part.get("errorText")}
    return {"error": f"no result ({state})"}
