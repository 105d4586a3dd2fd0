"""Tools in chat agents, end to end: real WebSocket clients, the real runtime and ws listener,
real SQLite files; the model is scripted (a test double of the model, not of gatewayd)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from gatewayd.agents import Agent, callable
from gatewayd.chat import AgentDevice, ChatAgent, ScriptedBackend
from gatewayd.tools import tool, tool_from_function
from tests.chat.conftest import user

pytestmark = pytest.mark.timeout(60)

SET_CALLS: list[dict[str, Any]] = []


def call(call_id: str, name: str, **args: Any) -> dict[str, Any]:
    return {"type": "tool-call", "toolCallId": call_id, "toolName": name, "input": args}


def say(text: str) -> dict[str, Any]:
    return {"type": "text-delta", "id": "t0", "delta": text}


def read_temperature(room: str) -> float:
    """The temperature of a room, in °C.

    Args:
        room: the room's number.
    """
    return {"2": 19.5}.get(room, 20.0)


def set_temperature(room: str, celsius: float) -> str:
    """Set a room's target temperature."""
    SET_CALLS.append({"room": room, "celsius": celsius})
    return f"room {room} set to {celsius}"


class Site(ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])
    tools = (
        tool_from_function(read_temperature),
        tool_from_function(set_temperature, needs_approval=lambda args: args["celsius"] > 20),
    )


def chunk_types(frames: list[dict]) -> list[str]:
    return [f["chunk"]["type"] for f in frames if f["type"] == "gw.chat.chunk"]


def tool_parts(message: dict) -> list[dict]:
    return [p for p in message["parts"] if p["type"] == "tool"]


def results_told(request: list[dict]) -> dict[str, Any]:
    """toolCallId -> what the model was told the call gave (from its last message)."""
    from gatewayd.chat.backends import tool_result_of

    return {p["toolCallId"]: tool_result_of(p) for p in tool_parts(request[-1])}


@pytest.fixture(autouse=True)
def _clean():
    SET_CALLS.clear()


async def test_a_server_tool_runs_and_the_model_gets_its_result(serve):
    Site.backend = ScriptedBackend(
        replies=[[call("c1", "read_temperature", room="2")], [say("It is 19.5 °C.")]]
    )
    async with serve({"site": Site}) as served, served.client("site", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "how warm is room 2?")])
        frames = await a.until_type("gw.chat.done")
        assert chunk_types(frames) == ["start", "tool-call", "tool-result", "text-delta", "finish"]
        assert "waiting" not in frames[-1] and frames[-1]["status"] == "complete"
        offered = {t["function"]["name"]: t["function"] for t in Site.backend.tools[0]}
        assert offered["read_temperature"]["parameters"]["properties"]["room"] == {
            "type": "string",
            "description": "the room's number.",
        }
        assert results_told(Site.backend.requests[1]) == {"c1": 19.5}
        answer = (await a.messages())[1]
        assert [p["type"] for p in answer["parts"]] == ["tool", "text"]
        assert answer["parts"][0]["state"] == "output-available"


async def test_bad_arguments_and_unknown_tools_give_the_model_an_error_not_a_crash(serve):
    Site.backend = ScriptedBackend(
        replies=[[call("c1", "read_temperature", floor=3), call("c2", "nope")], [say("sorry")]]
    )
    async with serve({"site": Site}) as served, served.client("site", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "?")])
        await a.until_type("gw.chat.done")
        told = results_told(Site.backend.requests[1])
        assert "room" in told["c1"]["error"] and "floor" in told["c1"]["error"]
        assert "no tool named 'nope'" in told["c2"]["error"]


async def approve_flow(served: Any, answer_fields: dict[str, Any]) -> list[dict]:
    """Connect, answer the waiting call c2 (as a new client), return its frames to done."""
    async with served.client("site", "s1") as b:
        stored = (await b.messages())[-1]
        part = tool_parts(stored)[-1]
        assert part["state"] == "approval-requested" and part["approval"]["id"]
        await b.send("gw.chat.tool_approval", id="a1", toolCallId="c2", **answer_fields)
        return await b.until(lambda f: f["type"] == "gw.chat.done" and f["request"] == "a1")


def ask_to_set_then_answer() -> ScriptedBackend:
    return ScriptedBackend(
        replies=[
            [
                call("c1", "read_temperature", room="2"),
                call("c2", "set_temperature", room="2", celsius=21),
            ],
            [say("Done.")],
        ]
    )


async def pause_for_approval(served: Any) -> None:
    async with served.client("site", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "set room 2 to 21")])
        frames = await a.until_type("gw.chat.done")
        assert chunk_types(frames) == [
            "start",
            "tool-call",
            "tool-call",
            "tool-result",
            "tool-approval-request",
            "finish",
        ]
        assert frames[-1]["waiting"] == [
            {"toolCallId": "c2", "toolName": "set_temperature", "kind": "approval"}
        ]
    assert SET_CALLS == []  # not before a person said yes


@pytest.mark.parametrize("pause", ["restart", "hibernation"])
async def test_an_approval_survives_a_restart_or_hibernation_and_the_chat_goes_on(
    serve, pause: str
):
    Site.backend = ask_to_set_then_answer()
    async with serve({"site": Site}) as served:
        await pause_for_approval(served)
        if pause == "hibernation":
            assert served.runtime.hibernate_idle() == 1
            frames = await approve_flow(served, {"approved": True})
    if pause == "restart":
        async with serve({"site": Site}) as served:
            frames = await approve_flow(served, {"approved": True})
    updated = next(f for f in frames if f["type"] == "gw.chat.message_updated")
    assert tool_parts(updated["message"])[1]["state"] == "approval-responded"
    assert chunk_types(frames) == ["start", "tool-result", "text-delta", "finish"]
    start = next(f for f in frames if f["type"] == "gw.chat.chunk")
    assert start["chunk"]["messageId"] == updated["message"]["id"]  # continues that message
    assert SET_CALLS == [{"room": "2", "celsius": 21.0}]
    assert results_told(Site.backend.requests[-1]) == {"c1": 19.5, "c2": "room 2 set to 21.0"}
    async with serve({"site": Site}) as served, served.client("site", "s1") as c:
        messages = await c.messages()
        assert [m["role"] for m in messages] == ["user", "assistant"]
        parts = messages[1]["parts"]
        assert [p["type"] for p in parts] == ["tool", "tool", "text"]
        assert parts[1]["state"] == "output-available"
        assert parts[1]["approval"]["approved"] is True
        assert parts[2]["text"] == "Done."


async def test_a_denial_still_gives_the_model_a_result_and_the_chat_goes_on(serve):
    Site.backend = ask_to_set_then_answer()
    async with serve({"site": Site}) as served:
        await pause_for_approval(served)
        frames = await approve_flow(served, {"approved": False, "reason": "too warm"})
        assert chunk_types(frames) == ["start", "text-delta", "finish"]
        told = results_told(Site.backend.requests[-1])
        assert told["c2"] == {"denied": True, "reason": "too warm"}
        assert SET_CALLS == []
        async with served.client("site", "s1") as c:
            parts = (await c.messages())[1]["parts"]
            assert parts[1]["state"] == "output-denied"
            assert parts[1]["approval"] == {
                "id": parts[1]["approval"]["id"],
                "approved": False,
                "reason": "too warm",
            }


async def test_an_approval_predicate_only_stops_the_calls_it_matches(serve):
    Site.backend = ScriptedBackend(
        replies=[[call("c1", "set_temperature", room="3", celsius=18)], [say("ok")]]
    )
    async with serve({"site": Site}) as served, served.client("site", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "room 3 to 18")])
        frames = await a.until_type("gw.chat.done")
        assert "tool-approval-request" not in chunk_types(frames)
        assert SET_CALLS == [{"room": "3", "celsius": 18.0}]


async def test_wrong_answers_get_a_chat_error_and_change_nothing(serve):
    Site.backend = ask_to_set_then_answer()
    async with serve({"site": Site}) as served:
        await pause_for_approval(served)
        async with served.client("site", "s1") as a:
            await a.send("gw.chat.tool_approval", id="x1", toolCallId="c9", approved=True)
            error = (await a.until_type("gw.chat.error"))[-1]
            assert error["request"] == "x1" and "no tool call 'c9'" in error["error"]
            await a.send("gw.chat.tool_approval", id="x2", toolCallId="c1", approved=True)
            error = (await a.until_type("gw.chat.error"))[-1]
            assert "not waiting" in error["error"] and "output-available" in error["error"]
            await a.send("gw.chat.tool_approval", id="x3", toolCallId="c2", approved="yes")
            error = (await a.until_type("gw.chat.error"))[-1]
            assert "'approved' must be true or false" in error["error"]
            await a.send("gw.chat.tool_result", id="x4", toolCallId="c2", output=1)
            error = (await a.until_type("gw.chat.error"))[-1]
            assert "not waiting for a client result" in error["error"]
        frames = await approve_flow(served, {"approved": True})
        assert frames[-1]["status"] == "complete"
        async with served.client("site", "s1") as a:
            await a.send("gw.chat.tool_approval", id="x5", toolCallId="c2", approved=False)
            error = (await a.until_type("gw.chat.error"))[-1]
            assert "not waiting" in error["error"]
        assert SET_CALLS == [{"room": "2", "celsius": 21.0}]


class ReadOnlySite(Site):
    def should_connection_be_readonly(self, conn, ctx):
        return True


async def test_a_read_only_connection_cannot_approve(serve):
    Site.backend = ask_to_set_then_answer()
    async with serve({"site": ReadOnlySite}) as served:
        await pause_for_approval(served)
        async with served.client("site", "s1") as a:
            await a.send("gw.chat.tool_approval", id="x1", toolCallId="c2", approved=True)
            error = (await a.until_type("gw.chat.error"))[-1]
            assert error == {
                "type": "gw.chat.error",
                "error": "connection is read-only",
                "request": "x1",
            }
        assert SET_CALLS == []


async def test_a_client_tool_is_run_by_the_client_and_the_chat_goes_on(serve):
    Site.backend = ScriptedBackend(
        replies=[[call("k1", "get_location")], [say("You are in Ghent.")]]
    )
    location_tool = {
        "name": "get_location",
        "description": "Where the user is.",
        "parameters": {"type": "object", "properties": {}},
    }
    async with serve({"site": Site}) as served:
        async with served.client("site", "s1") as a:
            await a.send(
                "gw.chat.send",
                id="r1",
                messages=[user("u1", "where am I?")],
                clientTools=[location_tool],
            )
            frames = await a.until_type("gw.chat.done")
            calls = [f["chunk"] for f in frames if f.get("chunk", {}).get("type") == "tool-call"]
            assert calls[0]["client"] is True
            assert frames[-1]["waiting"] == [
                {"toolCallId": "k1", "toolName": "get_location", "kind": "client"}
            ]
            assert "get_location" in {t["function"]["name"] for t in Site.backend.tools[0]}
        async with served.client("site", "s1") as b:  # a refreshed page answers
            await b.send("gw.chat.tool_result", id="t1", toolCallId="k1", output={"city": "Ghent"})
            frames = await b.until(lambda f: f["type"] == "gw.chat.done")
            assert frames[-1]["request"] == "t1"
            assert chunk_types(frames) == ["start", "text-delta", "finish"]
        assert results_told(Site.backend.requests[-1]) == {"k1": {"city": "Ghent"}}
        # the client tools were kept for the continuation
        assert "get_location" in {t["function"]["name"] for t in Site.backend.tools[-1]}


async def test_the_step_limit_stops_a_tool_loop(serve):
    class Looping(Site):
        max_steps = 3

    Site.backend = ScriptedBackend([call("", "read_temperature", room="1")])
    async with serve({"site": Looping}) as served, served.client("site", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "loop")])
        frames = await a.until_type("gw.chat.done")
        assert len(Site.backend.requests) == 3
        chunks = [f["chunk"] for f in frames if f["type"] == "gw.chat.chunk"]
        assert [c["type"] for c in chunks].count("tool-result") == 2
        assert chunks[-2]["type"] == "tool-error" and "step limit" in chunks[-2]["errorText"]
        assert chunks[-1] == {"type": "finish", "metadata": {"finishReason": "step-limit"}}
        ids = [c["toolCallId"] for c in chunks if c["type"] == "tool-call"]
        assert len(set(ids)) == 3  # the model gave no ids: each call got its own


BIG = "x" * 3_000_000


def big_report() -> str:
    """A 3 MB report."""
    return BIG


class Reporting(ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])
    tools = (tool_from_function(big_report),)


async def test_a_3_mb_tool_output_is_compacted_in_storage_but_reaches_the_model_in_full(serve):
    Reporting.backend = ScriptedBackend(replies=[[call("c1", "big_report")], [say("It is long.")]])
    async with serve({"chat": Reporting}) as served, served.client("chat", "c1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "report")])
        frames = await a.until_type("gw.chat.done")
        live = [f["chunk"] for f in frames if f["type"] == "gw.chat.chunk"]
        assert live[2] == {"type": "tool-result", "toolCallId": "c1", "output": BIG}  # live: full
        assert results_told(Reporting.backend.requests[1]) == {"c1": BIG}  # the model: full
        stored = (await a.messages())[1]
        part = tool_parts(stored)[0]
        assert len(part["output"]) < 2000 and "too large to store" in part["output"]
        assert part["output"].endswith("x" * 500)
        assert stored["metadata"]["compactedToolOutputs"] == ["c1"]
        assert len(json.dumps(stored)) < 1_800_000


class Thermostat(Agent):
    @callable
    def set_target(self, celsius: float) -> dict:
        """Set the target temperature.

        Args:
            celsius: the new target, in °C.
        """
        self.set_state({**(self.state or {}), "target": celsius})
        return {"target": celsius}


class Building(ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])
    devices = (AgentDevice("thermostat", "room2"),)

    @tool
    def note(self, text: str) -> int:
        """Write a note in the building's log (in this agent's own database)."""
        self.sql("CREATE TABLE IF NOT EXISTS log (text TEXT)")
        self.sql("INSERT INTO log VALUES (?)", text)
        return int(self.sql("SELECT COUNT(*) AS n FROM log")[0]["n"])


async def test_devices_and_the_agents_own_tools_are_tools(serve):
    Building.backend = ScriptedBackend(
        replies=[
            [
                call("c1", "thermostat_room2_set_target", celsius=21.5),
                call("c2", "note", text="warmer"),
            ],
            [say("done")],
        ]
    )
    async with serve({"chat": Building, "thermostat": Thermostat}) as served:
        async with served.client("chat", "b1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", "warmer in room 2")])
            await a.until_type("gw.chat.done")
        offered = {t["function"]["name"]: t["function"] for t in Building.backend.tools[0]}
        assert offered["thermostat_room2_set_target"]["parameters"]["properties"]["celsius"] == {
            "type": "number",
            "description": "the new target, in °C.",
        }
        assert results_told(Building.backend.requests[1]) == {"c1": {"target": 21.5}, "c2": 1}
        assert await served.runtime.get_agent_state("thermostat", "room2") == {"target": 21.5}


RELEASE: dict[str, Any] = {}


async def slow_check(room: str) -> str:
    """A slow inspection of a room."""
    await RELEASE["gate"].wait()
    return f"room {room} checked"


class Slow(Site):
    tools = (*Site.tools, tool_from_function(slow_check))


async def test_an_approval_sent_while_the_answer_still_streams_is_applied_when_it_ends(serve):
    import asyncio

    RELEASE["gate"] = asyncio.Event()
    Site.backend = ScriptedBackend(
        replies=[
            [
                call("c2", "set_temperature", room="2", celsius=22),
                call("c3", "slow_check", room="2"),
            ],
            [say("Set and checked.")],
        ]
    )
    async with serve({"site": Slow}) as served, served.client("site", "s1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "set and check")])
        await a.until(lambda f: f.get("chunk", {}).get("type") == "tool-approval-request")
        await a.send("gw.chat.tool_approval", id="a1", toolCallId="c2", approved=True)
        await a.send("gw.chat.tool_approval", id="a2", toolCallId="c2", approved=False)
        error = (await a.until_type("gw.chat.error"))[-1]
        assert error["request"] == "a2" and "already has an answer" in error["error"]
        assert SET_CALLS == []
        RELEASE["gate"].set()  # the first answer ends, waiting; the stored approval applies
        first = await a.until(lambda f: f["type"] == "gw.chat.done")
        assert first[-1]["request"] == "r1" and first[-1]["waiting"][0]["toolCallId"] == "c2"
        frames = await a.until(lambda f: f["type"] == "gw.chat.done")
        assert frames[-1]["request"] == "a1" and frames[-1]["status"] == "complete"
        assert chunk_types(frames) == ["start", "tool-result", "text-delta", "finish"]
        assert SET_CALLS == [{"room": "2", "celsius": 22.0}]
        told = results_told(Site.backend.requests[-1])
        assert told == {"c2": "room 2 set to 22.0", "c3": "room 2 checked"}
