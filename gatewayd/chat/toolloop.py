"""The steps of one answer: call the model, run the tools it asked for, call it again.

    async for chunk in run_steps(model, history, builder, tools, max_steps=10):
        ...

Runs outside any turn (in the chat agent's stream task). One answer is ONE stream and ONE
assistant message, whatever the number of steps (PROTOCOL.md, "Tools, client tools and
approvals"): the backend's own `start`/`finish` chunks are folded into one of each, and its
delta ids are made unique per step so that text after a tool call is a new part. The model
gets the conversation plus the message being built, in full (never the compacted stored copy).

A tool call is run at once (server tool), or waits: for a person when the tool's
`needs_approval` says so, for the client when it is a client tool. Waiting calls end the
answer after the step's other calls ran; `continue_calls` runs the approved ones when the
answer is continued. `max_steps` bounds the model calls: the calls asked for by the last
allowed step are not run (each gets a "step limit reached" tool error).

A server tool may add chunks to the answer while it runs (`TOOL_EVENTS`: Code Mode's program
calls that wait for approval, chat/codemode.py); they are yielded as they come.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gatewayd.chat.messages import Chunk, InvalidMessageError, Message, MessageBuilder
from gatewayd.tools import Tool, ToolError

logger = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 10
STEP_LIMIT = "step-limit"
WAITING = "waiting"

Model = Callable[[list[Message]], Any]  # -> AsyncIterator[Chunk] (or an awaitable of one)


@dataclass(frozen=True, slots=True)
class ToolEvents:
    """What a server tool sees of the call it runs (`TOOL_EVENTS.get()`): the call's id, and
    `emit(chunk)` to add chunks to the answer while it runs (Code Mode: a program's calls
    that wait for a person's approval)."""

    call_id: str
    emit: Callable[[Chunk], None]


TOOL_EVENTS: contextvars.ContextVar[ToolEvents | None] = contextvars.ContextVar(
    "gatewayd_chat_tool_events", default=None
)


@dataclass(slots=True)
class ToolSet:
    """The tools one answer may use: server tools (run here) and client tools (specs only)."""

    server: dict[str, Tool] = field(default_factory=dict)
    client: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, server: Sequence[Tool], client: Sequence[Mapping[str, Any]] = ()) -> ToolSet:
        tools = cls()
        for tool in server:
            if tool.name in tools.server:
                raise ValueError(f"two tools are named {tool.name!r}")
            tools.server[tool.name] = tool
        for spec in client:
            name = str(spec["name"])
            if name not in tools.server:  # a server tool of that name wins
                tools.client[name] = dict(spec)
        return tools

    def specs(self) -> list[dict[str, Any]]:
        """OpenAI-style function specs of every tool (what the backend offers the model)."""
        specs = [tool.openai_spec() for tool in self.server.values()]
        for name, spec in self.client.items():
            specs.append(
                {
                    "type": "function",
                    "function": {
                        "name": name,
                        "description": str(spec.get("description") or name),
                        "parameters": spec.get("parameters")
                        or {"type": "object", "properties": {}},
                    },
                }
            )
        return specs


def check_client_tools(value: Any) -> list[dict[str, Any]]:
    """`clientTools` of a `gw.chat.send`: a list of `{name, description?, parameters?}`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidMessageError(
            "'clientTools' must be a list of {name, description?, parameters?}"
        )
    specs = []
    for i, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidMessageError(f"clientTools[{i}]: needs a non-empty string 'name'")
        parameters = spec.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type") != "object"
        ):
            raise InvalidMessageError(
                f"clientTools[{i}] ({spec['name']}): 'parameters' must be a JSON schema of type object"
            )
        specs.append(
            {k: spec[k] for k in ("name", "description", "parameters") if spec.get(k) is not None}
        )
    return specs


async def run_steps(
    model: Model,
    history: list[Message],
    builder: MessageBuilder,
    tools: ToolSet,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> AsyncIterator[Chunk]:
    """The chunks of one answer (or of its continuation, when `builder` continues a stored
    message); each is applied to `builder` before it is yielded."""

    def emit(chunk: Chunk) -> Chunk:
        builder.apply(chunk)
        return chunk

    yield emit({"type": "start", "messageId": builder.message["id"]})
    async for chunk in continue_calls(builder.message, tools):
        yield emit(chunk)
    metadata: dict[str, Any] = {}
    step = 0
    while True:
        step += 1
        calls: list[Chunk] = []
        stream = model([*history, builder.message] if builder.message["parts"] else history)
        if inspect.isawaitable(stream):
            stream = await stream
        async for chunk in stream:
            kind = chunk.get("type")
            if kind == "start":
                continue
            if kind == "finish":
                if isinstance(chunk.get("metadata"), dict):
                    metadata.update(chunk["metadata"])
                continue
            if kind in ("text-delta", "reasoning-delta") and step > 1:
                chunk = {**chunk, "id": f"s{step}-{chunk.get('id', '')}"}
            elif kind == "tool-call":
                call_id = chunk.get("toolCallId")
                if not isinstance(call_id, str) or not call_id or _has_call(builder, call_id):
                    chunk = {**chunk, "toolCallId": f"call_{uuid.uuid4().hex[:12]}"}
                if chunk.get("toolName") in tools.client:
                    chunk = {**chunk, "client": True}
                calls.append(chunk)
            yield emit(chunk)
        if not calls:
            break
        if step >= max_steps:
            for call in calls:
                if not call.get("client"):
                    yield emit(
                        {
                            "type": "tool-error",
                            "toolCallId": call["toolCallId"],
                            "errorText": f"step limit reached ({max_steps} model calls): not run",
                        }
                    )
            metadata["finishReason"] = STEP_LIMIT
            break
        waiting = False
        for call in calls:
            if call.get("client"):
                waiting = True
                continue
            async for chunk in _run_call(call, tools, check_approval=True):
                # (a program's own calls may ask for approval while it runs: not this call)
                if (
                    chunk["type"] == "tool-approval-request"
                    and chunk["toolCallId"] == call["toolCallId"]
                ):
                    waiting = True
                yield emit(chunk)
        if waiting:
            metadata["finishReason"] = WAITING
            break
    finish: Chunk = {"type": "finish"}
    if metadata:
        finish["metadata"] = metadata
    yield emit(finish)


async def continue_calls(message: Message, tools: ToolSet) -> AsyncIterator[Chunk]:
    """Run the calls of `message` a person approved (state "approval-responded")."""
    approved = [
        p
        for p in message.get("parts", ())
        if p.get("type") == "tool" and p.get("state") == "approval-responded"
    ]
    for part in approved:
        call = {
            "toolCallId": part["toolCallId"],
            "toolName": part["toolName"],
            "input": part.get("input"),
        }
        async for chunk in _run_call(call, tools, check_approval=False):
            yield chunk


async def _run_call(call: Chunk, tools: ToolSet, *, check_approval: bool) -> AsyncIterator[Chunk]:
    call_id = call["toolCallId"]
    name = call.get("toolName")
    tool = tools.server.get(str(name))
    if tool is None:
        known = ", ".join(sorted([*tools.server, *tools.client])) or "none"
        yield _error(call_id, f"no tool named {name!r} (tools: {known})")
        return
    try:
        args = tool.check(call.get("input"))
        if check_approval and tool.approval_required(args):
            yield {
                "type": "tool-approval-request",
                "toolCallId": call_id,
                "approvalId": f"apr_{uuid.uuid4().hex[:16]}",
            }
            return
        output = None
        async for event in _invoke_with_events(tool, call):  # it validates again
            if isinstance(event, _Output):
                output = event.value
            else:
                yield event
        json.dumps(output)  # the result must be JSON: say so here, not when it is stored
    except ToolError as err:
        yield _error(call_id, str(err))
        return
    except (TypeError, ValueError) as err:
        yield _error(call_id, f"{name}: {type(err).__name__}: {err}")
        return
    except Exception as err:
        logger.info("chat: tool %s failed: %s: %s", name, type(err).__name__, err)
        yield _error(call_id, f"{name} failed: {type(err).__name__}: {err}")
        return
    yield {"type": "tool-result", "toolCallId": call_id, "output": output}


@dataclass(frozen=True, slots=True)
class _Output:
    value: Any


async def _invoke_with_events(tool: Tool, call: Chunk) -> AsyncIterator[Chunk | _Output]:
    """Run the tool; the chunks it emits meanwhile (`TOOL_EVENTS`), then its `_Output`.
    Its exceptions propagate; closing this generator cancels the tool."""
    queue: asyncio.Queue[Chunk] = asyncio.Queue()
    context = contextvars.copy_context()
    context.run(TOOL_EVENTS.set, ToolEvents(call["toolCallId"], queue.put_nowait))
    loop = asyncio.get_running_loop()
    task = loop.create_task(tool.invoke(call.get("input")), context=context)
    try:
        while not task.done():
            getter = loop.create_task(queue.get())
            try:
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()
        while not queue.empty():
            yield queue.get_nowait()
        yield _Output(task.result())
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


def _has_call(builder: MessageBuilder, call_id: str) -> bool:
    return any(p.get("toolCallId") == call_id for p in builder.message["parts"])


def _error(call_id: str, text: str) -> Chunk:
    return {"type": "tool-error", "toolCallId": call_id, "errorText": text}
