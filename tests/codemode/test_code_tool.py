"""The `code` tool a chat agent offers: the site task through real agents, and approval."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gatewayd.codemode import CodeExecutor, Limits, ToolCall, code_tool
from gatewayd.tools import ToolInputError, tool, tool_from_function
from tests.codemode.conftest import shared_executor
from tests.codemode.site import PROGRAM, TASK, expected_rooms, site

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_the_site_task_in_one_program_through_the_agents(
    executor: CodeExecutor, tmp_path: Path
) -> None:
    async with site(tmp_path) as the_site:
        code = code_tool(executor, the_site.tools)
        assert code.name == "code" and code.parameters["required"] == ["code"]
        assert "thermostat_set_target(input: {" in code.description
        assert "async () =>" in code.description
        answer = await code.invoke({"code": PROGRAM})
        targets = await the_site.targets()
    rooms = expected_rooms()
    assert answer == {"result": rooms}
    assert 0 < len(rooms) < 50, TASK
    changed = {agent for agent, target in targets.items() if target == 21.0}
    assert len(changed) == len(rooms)
    assert set(targets.values()) == {20.0, 21.0}


async def test_bad_arguments_are_refused(executor: CodeExecutor) -> None:
    code = code_tool(executor, [])
    with pytest.raises(ToolInputError, match="code: the program"):
        await code.invoke({"code": "  "})
    with pytest.raises(ToolInputError, match="unexpected arguments language"):
        await code.invoke({"code": "return 1", "language": "js"})
    assert await code.invoke({"code": "return 1"}) == {"result": 1}
    assert code.read_only  # no tools: nothing it can change


def heating_tools(log: list[str]) -> list:
    @tool(needs_approval=lambda args: args["celsius"] > 25)
    async def heat(celsius: float) -> float:
        """Heat to a temperature."""
        log.append(f"heat {celsius}")
        return celsius

    @tool(needs_approval=True)
    async def reboot() -> str:
        """Reboot the gateway."""
        log.append("reboot")
        return "rebooting"

    return [tool_from_function(heat), tool_from_function(reboot)]


async def test_calls_that_need_approval_wait_for_it(executor: CodeExecutor) -> None:
    done: list[str] = []
    asked: list[ToolCall] = []

    async def approve(call: ToolCall) -> bool:
        asked.append(call)
        return call.tool.name == "heat"

    code = code_tool(executor, heating_tools(done), approve=approve)
    assert "Needs a person's approval" in code.description
    answer = await code.invoke(
        {
            "code": "async () => {"
            "  const low = await codemode.heat({celsius: 20});"
            "  const high = await codemode.heat({celsius: 30});"
            "  let reboot; try { reboot = await codemode.reboot() } catch (e) { reboot = e.message }"
            "  return [low, high, reboot];"
            "}"
        }
    )
    assert answer == {"result": [20, 30, "reboot: the call was denied by the person approving it"]}
    assert [(c.tool.name, dict(c.args)) for c in asked] == [
        ("heat", {"celsius": 30.0}),
        ("reboot", {}),
    ]
    assert done == ["heat 20.0", "heat 30.0"]


async def test_without_an_approver_such_calls_are_refused(executor: CodeExecutor) -> None:
    done: list[str] = []
    code = code_tool(executor, heating_tools(done))
    answer = await code.invoke({"code": "return await codemode.reboot()"})
    assert answer == {
        "error": "ToolError: reboot needs a person's approval, and none can be asked here"
    }
    assert done == []


async def test_the_wall_clock_stops_while_a_person_decides() -> None:
    done: list[str] = []
    answered = asyncio.Event()

    async def slow_person(call: ToolCall) -> bool:
        await asyncio.sleep(1.5)  # the person takes longer than the program may run
        answered.set()
        return True

    async with shared_executor(Limits(wall_time_s=1.0), workers=1) as pool:
        code = code_tool(pool, heating_tools(done), approve=slow_person)
        answer = await code.invoke({"code": "return await codemode.reboot()"})
    assert answered.is_set()
    assert answer == {"result": "rebooting"}
    assert done == ["reboot"]
