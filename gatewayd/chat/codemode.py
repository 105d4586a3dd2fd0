"""Code Mode for chat agents: the model gets one `code` tool (gatewayd.codemode.code_tool)
whose typed API is the agent's server tools, and writes one program instead of many calls.

    class Site(ChatAgent):
        code_mode = True           # or `code_mode = true` in [chat.agents.Site]

A program's call to a tool that needs approval pauses (its wall-clock limit stops) and shows
in the answer as a tool part of its own, marked `programCallId` (the `code` call's id), in
state "approval-requested": any client answers it with the usual `gw.chat.tool_approval`,
while the answer is still streaming. Approved: the call runs and its part gets the result;
denied: the program's call rejects with a catchable error. Those parts are for people: the
model never sees them (`without_program_calls`), only what the program returns and logs.

`FencedPrograms(backend)` lets a small model that writes its program as a fenced code block
(not as a tool call) work in Code Mode: the block becomes the `code` call.

A program cannot outlive the process: when the answer ends any other way than complete (the
gateway stopped or crashed, the answer was cancelled), `end_cut_programs` turns the `code`
call and its waiting calls into tool errors that say so.

This module imports `gatewayd.codemode` lazily (only a code-mode agent needs mini-racer).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from pydantic_core import to_jsonable_python

from gatewayd.chat.messages import Chunk, Message
from gatewayd.chat.toolloop import TOOL_EVENTS
from gatewayd.tools import Tool, ToolError

CODE_TOOL = "code"
_FINAL = ("output-available", "output-error", "output-denied")

# The program-call part a person approved, for the tool call that follows the approval (the
# sandbox's caller runs approval and call in one task: this is set in that task's context).
_APPROVED_PART: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gatewayd_chat_approved_program_call", default=None
)


@dataclasses.dataclass(slots=True)
class _Waiting:
    owner: tuple[Any, Any]  # (runtime, agent key): a host is new at each wake
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[bool, str | None]]


# Program calls waiting for a person, by their tool call id (in this process only).
_WAITING: dict[str, _Waiting] = {}


def build_code_tool(executor: Any, tools: Sequence[Tool], host: Any) -> Tool:
    """The `code` tool offering `tools` to programs run on `executor` (a CodeExecutor), with
    approvals asked through the chat of the agent `host` serves."""
    from gatewayd.codemode import code_tool

    async def approve(call: Any) -> bool:
        return await _approve_in_chat(host, call.tool, _as_schema_names(call.tool, call.args))

    return code_tool(executor, [_reporting(t) for t in tools], approve=approve, name=CODE_TOOL)


def missing_executor_tool(agent_class: str) -> Tool:
    """A `code` tool that says why it cannot run (the agent has no executor)."""

    def code(code: str) -> None:
        raise ToolError(
            f"{agent_class}: Code Mode has no executor here (the daemon provides one; "
            "outside it set `code_executor = CodeExecutor(...)` on the class)"
        )

    return Tool(
        name=CODE_TOOL,
        description="Run a JavaScript program (unavailable).",
        parameters={
            "type": "object",
            "properties": {"code": {"type": "string"}},
            "required": ["code"],
        },
        fn=code,
    )


def answer_program_call(host: Any, tool_call_id: str, approved: bool, reason: str | None) -> bool:
    """Give a waiting program call of the chat `host` serves (the same agent of the same
    runtime, awake since or not) its answer; False if none waits by that id (the answer is
    then handled as any other)."""
    waiting = _WAITING.get(tool_call_id)
    if waiting is None or not _same_agent(waiting.owner, _owner(host)):
        return False
    del _WAITING[tool_call_id]

    def resolve() -> None:
        if not waiting.future.done():
            waiting.future.set_result((approved, reason))

    waiting.loop.call_soon_threadsafe(resolve)
    return True


def without_program_calls(messages: list[Message]) -> list[Message]:
    """`messages` without the parts of calls made by programs (the model made none of them)."""
    if not any(
        "programCallId" in part for message in messages for part in message.get("parts", ())
    ):
        return messages
    return [
        {**m, "parts": [p for p in m.get("parts", ()) if "programCallId" not in p]}
        for m in messages
    ]


def end_cut_programs(message: Message, status: str) -> None:
    """In an answer that ended `status` (not complete), the `code` calls left running and
    their waiting calls become tool errors that say so (in place)."""
    text = (
        f"interrupted: the answer ended ({status}) while the program ran (the gateway stopped, "
        "or the answer was cancelled); it did not finish, and calls it made before may have "
        "taken effect"
    )
    for part in message.get("parts", ()):
        if part.get("type") != "tool" or part.get("state") in _FINAL:
            continue
        if "programCallId" in part or part.get("toolName") == CODE_TOOL:
            part.update(state="output-error", errorText=text)


async def _approve_in_chat(host: Any, tool: Tool, args: dict[str, Any]) -> bool:
    events = TOOL_EVENTS.get()
    if events is None:  # not run by a chat's tool loop: nobody can be asked
        return False
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[bool, str | None]] = loop.create_future()
    _WAITING[call_id] = _Waiting(_owner(host), loop, future)
    try:
        events.emit(
            {
                "type": "tool-call",
                "toolCallId": call_id,
                "toolName": tool.name,
                "input": args,
                "programCallId": events.call_id,
            }
        )
        events.emit(
            {
                "type": "tool-approval-request",
                "toolCallId": call_id,
                "approvalId": f"apr_{uuid.uuid4().hex[:16]}",
            }
        )
        approved, reason = await future
    finally:
        _WAITING.pop(call_id, None)
    if not approved:
        why = f": {reason}" if reason else ""
        events.emit(
            {
                "type": "tool-error",
                "toolCallId": call_id,
                "errorText": f"denied by the person approving it{why}",
            }
        )
        return False
    _APPROVED_PART.set(call_id)
    return True


def _owner(host: Any) -> tuple[Any, Any]:
    return getattr(host, "runtime", None), host.key


def _same_agent(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    return a[0] is b[0] and a[1] == b[1]


def _as_schema_names(tool: Tool, args: Any) -> dict[str, Any]:
    """Checked arguments as a person reads them: under the names of the tool's schema (a
    validator may rename one for the call, e.g. `agent_id` -> `__agent_id`)."""
    properties = tool.parameters.get("properties", {})
    shown = {}
    for key, value in dict(args).items():
        name = key.lstrip("_")
        shown[name if key not in properties and name in properties else key] = value
    return shown


def _reporting(tool: Tool) -> Tool:
    """`tool`, whose approved calls report their result to the chat (their part)."""
    if tool.needs_approval is False:
        return tool
    fn = tool.fn

    async def run(**args: Any) -> Any:
        part_id = _APPROVED_PART.get()
        _APPROVED_PART.set(None)
        events = TOOL_EVENTS.get()
        try:
            value = fn(**args)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            if part_id is not None and events is not None:
                events.emit(
                    {
                        "type": "tool-error",
                        "toolCallId": part_id,
                        "errorText": f"{tool.name} failed: {type(exc).__name__}: {exc}",
                    }
                )
            raise
        if part_id is not None and events is not None:
            events.emit(
                {
                    "type": "tool-result",
                    "toolCallId": part_id,
                    "output": to_jsonable_python(value),
                }
            )
        return value

    return dataclasses.replace(tool, fn=run)


_FENCED = re.compile(r"```(?:js|javascript|ts|typescript)?[ \t]*\n(.*?)(?:```|$)", re.S)


class FencedPrograms:
    """A backend wrapper for small models that write a program as a fenced code block rather
    than as a `code` tool call: when a model step offered `code` makes no tool call but its
    text has a fenced block, the first block becomes a `code` call (after the text). Only
    for a step that answers a person (not one that answers the program's result).

        backend = FencedPrograms(LocalBackend(generator))
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Chunk]:
        offers_code = any(
            spec.get("function", spec).get("name") == CODE_TOOL for spec in tools or ()
        )
        answers_person = bool(messages) and messages[-1].get("role") == "user"
        text, called, finish = "", False, None
        async for chunk in self.backend.stream(messages, system=system, tools=tools):
            kind = chunk.get("type")
            if kind == "finish":
                finish = chunk
                continue
            if kind == "text-delta":
                text += str(chunk.get("delta", ""))
            elif kind == "tool-call":
                called = True
            yield chunk
        match = _FENCED.search(text) if offers_code and answers_person and not called else None
        if match is not None and match.group(1).strip():
            yield {
                "type": "tool-call",
                "toolCallId": f"call_{uuid.uuid4().hex[:12]}",
                "toolName": CODE_TOOL,
                "input": {"code": match.group(1).strip()},
            }
        if finish is not None:
            yield finish
