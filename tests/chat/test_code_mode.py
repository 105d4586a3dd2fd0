"""A chat agent in Code Mode, end to end: real WebSocket clients, the real runtime and ws
listener, real SQLite, real sandbox worker processes (V8); the thermostats are real agents.
The model is scripted (a test double of the model, not of gatewayd): it writes the program."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import pytest

from gatewayd.chat import ChatAgent, FencedPrograms, ScriptedBackend
from gatewayd.codemode import CodeExecutor, Limits
from gatewayd.tools import Tool
from tests.chat.conftest import ChatClient, Served, user
from tests.codemode.site import (
    DEVICES,
    PROGRAM,
    TASK,
    Site,
    SiteThermostat,
    device_id,
    expected_rooms,
    seeded,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


class SiteChat(ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])
    code_mode = True


def code_call(call_id: str, program: str) -> dict[str, Any]:
    return {
        "type": "tool-call",
        "toolCallId": call_id,
        "toolName": "code",
        "input": {"code": program},
    }


def say(text: str) -> dict[str, Any]:
    return {"type": "text-delta", "id": "t0", "delta": text}


def tool_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in message["parts"] if p["type"] == "tool"]


@asynccontextmanager
async def site_served(
    serve: Any, tools: list[Tool] | None = None, **settings: Any
) -> AsyncIterator[Served]:
    async with CodeExecutor(Limits(wall_time_s=20.0), workers=1) as executor:
        SiteChat.code_executor = executor
        try:
            classes = {"chat": SiteChat, "thermostat": SiteThermostat}
            async with serve(classes, **settings) as served:
                for i in range(DEVICES):
                    room, temperature, target = seeded(i)
                    await served.runtime.call(
                        "thermostat", device_id(i), "install", room, temperature, target
                    )
                SiteChat.tools = tools if tools is not None else Site(served.runtime).tools
                yield served
        finally:
            SiteChat.code_executor = None
            SiteChat.tools = ()


async def targets(served: Served) -> dict[str, float]:
    return {
        device_id(i): (await served.runtime.get_agent_state("thermostat", device_id(i)))["target_c"]
        for i in range(DEVICES)
    }


async def test_the_site_task_in_one_program(serve):
    SiteChat.backend = ScriptedBackend(
        replies=[[code_call("c1", PROGRAM)], [say("Raised the rooms the program reported.")]]
    )
    async with site_served(serve) as served, served.client("chat", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", TASK)])
        frames = await a.until_type("gw.chat.done")
        assert frames[-1]["status"] == "complete"
        # The model was offered one tool, `code`, whose description is the typed API.
        offered = [t["function"] for t in SiteChat.backend.tools[0]]
        assert [t["name"] for t in offered] == ["code"]
        for name in ("thermostats_list", "thermostat_read", "thermostat_set_target"):
            assert f"{name}(input" in offered[0]["description"]
        # Two model calls; the second is told the rooms the program changed, nothing else.
        assert len(SiteChat.backend.requests) == 2
        told = tool_parts(SiteChat.backend.requests[1][-1])
        assert [(p["toolName"], p["state"]) for p in told] == [("code", "output-available")]
        assert told[0]["output"] == {"result": expected_rooms()}
        # The thermostats' own state changed, and only the cold ones.
        after = await targets(served)
        cold = {device_id(i) for i in range(DEVICES) if seeded(i)[1] < 19.0}
        assert cold and len(cold) < DEVICES
        assert after == {d: 21.0 if d in cold else 20.0 for d in after}
        stored = (await a.messages())[-1]
        assert tool_parts(stored)[0]["output"] == {"result": expected_rooms()}


async def test_a_fenced_program_in_the_text_is_run_as_the_code_call(serve):
    model = ScriptedBackend(
        replies=[[say(f"Here it is:\n```js\n{PROGRAM}\n```\n")], [say("```js\nnot run\n```")]]
    )
    SiteChat.backend = FencedPrograms(model)  # type: ignore[assignment]
    async with site_served(serve) as served, served.client("chat", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", TASK)])
        frames = await a.until_type("gw.chat.done")
        assert frames[-1]["status"] == "complete"
        answer = (await a.messages())[-1]
        assert [p["type"] for p in answer["parts"]] == ["text", "tool", "text"]
        code = answer["parts"][1]
        assert code["toolName"] == "code" and code["input"] == {"code": PROGRAM}
        assert code["output"] == {"result": expected_rooms()}
        assert len(model.requests) == 2  # the answer to the result is not run again
        assert (await targets(served))["t01"] == 21.0


APPROVAL_PROGRAM = """async () => {
  const out = [];
  for (const id of ["t01", "t02"]) {
    try {
      out.push(await codemode.thermostat_set_target({ agent_id: id, target_c: 25 }));
    } catch (e) {
      out.push("refused: " + e.message);
    }
  }
  return out;
}"""


def approval_tools(served: Served) -> list[Tool]:
    tools = Site(served.runtime).tools
    return [
        dataclasses.replace(t, needs_approval=True) if t.name == "thermostat_set_target" else t
        for t in tools
    ]


async def next_approval_request(client: ChatClient) -> dict[str, Any]:
    """The program call announced before the next approval request, with its request."""
    calls: dict[str, dict[str, Any]] = {}
    while True:
        frame = await client.next_frame()
        if frame["type"] != "gw.chat.chunk":
            continue
        chunk = frame["chunk"]
        if chunk["type"] == "tool-call":
            calls[chunk["toolCallId"]] = chunk
        if chunk["type"] == "tool-approval-request":
            return calls[chunk["toolCallId"]]


async def test_a_programs_calls_wait_for_approval_from_another_client(serve):
    SiteChat.backend = ScriptedBackend(replies=[[code_call("c1", APPROVAL_PROGRAM)], [say("ok")]])
    async with site_served(serve, tools=[]) as served:
        SiteChat.tools = approval_tools(served)
        async with served.client("chat", "s1") as a, served.client("chat", "s1") as b:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "set t01 and t02")])
            first = await next_approval_request(b)
            assert first["programCallId"] == "c1"
            assert first["toolName"] == "thermostat_set_target"
            assert first["input"] == {"agent_id": "t01", "target_c": 25}
            # Nothing ran yet: the program waits on the person.
            assert (await served.runtime.get_agent_state("thermostat", "t01"))["target_c"] == 20
            await b.send("gw.chat.tool_approval", toolCallId=first["toolCallId"], approved=True)
            second = await next_approval_request(b)
            assert second["input"] == {"agent_id": "t02", "target_c": 25}
            await b.send(
                "gw.chat.tool_approval",
                toolCallId=second["toolCallId"],
                approved=False,
                reason="not t02",
            )
            frames = await a.until_type("gw.chat.done")
            assert frames[-1]["status"] == "complete" and "waiting" not in frames[-1]
            stored = (await a.messages())[-1]
        parts = {p["toolCallId"]: p for p in tool_parts(stored)}
        result = parts["c1"]["output"]["result"]
        assert result[0] == 25
        assert result[1].startswith("refused: ") and "denied" in result[1]
        assert parts[first["toolCallId"]]["state"] == "output-available"
        assert parts[first["toolCallId"]]["output"] == 25
        assert parts[second["toolCallId"]]["state"] == "output-error"
        assert "not t02" in parts[second["toolCallId"]]["errorText"]
        assert (await served.runtime.get_agent_state("thermostat", "t01"))["target_c"] == 25
        assert (await served.runtime.get_agent_state("thermostat", "t02"))["target_c"] == 20
        # The model is told what the program returned, never about the program's own calls.
        told = tool_parts(SiteChat.backend.requests[1][-1])
        assert [p["toolCallId"] for p in told] == ["c1"]


async def test_an_answer_to_a_finished_program_call_is_refused(serve):
    SiteChat.backend = ScriptedBackend(replies=[[code_call("c1", APPROVAL_PROGRAM)], [say("ok")]])
    async with site_served(serve, tools=[]) as served:
        SiteChat.tools = approval_tools(served)
        async with served.client("chat", "s1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "set t01 and t02")])
            first = await next_approval_request(a)
            await a.send("gw.chat.tool_approval", toolCallId=first["toolCallId"], approved=False)
            second = await next_approval_request(a)
            await a.send("gw.chat.tool_approval", toolCallId=second["toolCallId"], approved=False)
            await a.until_type("gw.chat.done")
            await a.send(
                "gw.chat.tool_approval", id="late", toolCallId=first["toolCallId"], approved=True
            )
            error = (await a.until(lambda f: f["type"] == "gw.chat.error"))[-1]
            assert error["request"] == "late" and "not waiting" in error["error"]
        after = await targets(served)
        assert after["t01"] == after["t02"] == 20


async def test_a_program_waiting_for_approval_ends_interrupted_by_a_restart(serve):
    SiteChat.backend = ScriptedBackend(replies=[[code_call("c1", APPROVAL_PROGRAM)], [say("ok")]])
    async with site_served(serve, tools=[]) as served:
        SiteChat.tools = approval_tools(served)
        async with served.client("chat", "s1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "set t01 and t02")])
            first = await next_approval_request(a)
    # The runtime stopped while the program waited; a new one serves the same files.
    async with site_served(serve, tools=[]) as served, served.client("chat", "s1") as b:
        stored = (await b.messages())[-1]
        parts = {p["toolCallId"]: p for p in tool_parts(stored)}
        for call_id in ("c1", first["toolCallId"]):
            assert parts[call_id]["state"] == "output-error"
            assert parts[call_id]["errorText"].startswith("interrupted: ")
        await b.send(
            "gw.chat.tool_approval", id="late", toolCallId=first["toolCallId"], approved=True
        )
        error = (await b.until(lambda f: f["type"] == "gw.chat.error"))[-1]
        assert error["request"] == "late" and "not waiting" in error["error"]
        assert (await served.runtime.get_agent_state("thermostat", "t01"))["target_c"] == 20


async def test_cancelling_the_answer_ends_a_waiting_program(serve):
    SiteChat.backend = ScriptedBackend(
        replies=[[code_call("c1", APPROVAL_PROGRAM)], [code_call("c2", PROGRAM)], [say("ok")]]
    )
    async with site_served(serve, tools=[]) as served:
        SiteChat.tools = approval_tools(served)
        async with served.client("chat", "s1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "set t01 and t02")])
            first = await next_approval_request(a)
            await a.send("gw.chat.cancel")
            done = (await a.until_type("gw.chat.done"))[-1]
            assert done["status"] == "cancelled"
            parts = {p["toolCallId"]: p for p in tool_parts((await a.messages())[-1])}
            for call_id in ("c1", first["toolCallId"]):
                assert parts[call_id]["state"] == "output-error"
                assert "interrupted: " in parts[call_id]["errorText"]
            # The chat and the sandbox go on: the next program solves the site task.
            SiteChat.tools = Site(served.runtime).tools
            await a.send("gw.chat.send", id="r2", messages=[user("u2", TASK)])
            frames = await a.until(lambda f: f["type"] == "gw.chat.done" and f["request"] == "r2")
            assert frames[-1]["status"] == "complete"
            parts = {p["toolCallId"]: p for p in tool_parts((await a.messages())[-1])}
            assert parts["c2"]["output"] == {"result": expected_rooms()}


async def test_an_approval_reaches_a_program_whose_agent_hibernated_meanwhile(serve):
    SiteChat.backend = ScriptedBackend(replies=[[code_call("c1", APPROVAL_PROGRAM)], [say("ok")]])
    async with site_served(serve, tools=[], hibernate_after_s=0.2) as served:
        SiteChat.tools = approval_tools(served)
        async with served.client("chat", "s1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "set t01 and t02")])
            first = await next_approval_request(a)
            await wait_until(
                lambda: not served.runtime.is_awake("chat", "s1"), 10, "the chat agent to hibernate"
            )
            await a.send("gw.chat.tool_approval", toolCallId=first["toolCallId"], approved=True)
            second = await next_approval_request(a)
            await a.send("gw.chat.tool_approval", toolCallId=second["toolCallId"], approved=True)
            frames = await a.until_type("gw.chat.done")
            assert frames[-1]["status"] == "complete"
            parts = {p["toolCallId"]: p for p in tool_parts((await a.messages())[-1])}
            assert parts["c1"]["output"] == {"result": [25, 25]}
