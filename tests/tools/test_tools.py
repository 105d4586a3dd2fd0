"""Tools: schemas from type hints and docstrings, validation with clear errors, agent methods
as tools, `@callable` methods reached through the real agent runtime."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from gatewayd.tools import (
    Tool,
    ToolInputError,
    agent_tools,
    callable_tools,
    tool,
    tool_from_function,
)


def set_target(room: str, celsius: float, mode: Literal["heat", "cool"] = "heat") -> str:
    """Set a room's target temperature.

    Rooms are named as on the floor plan.

    Args:
        room: The room, e.g.
            "kitchen".
        celsius: Target in degrees Celsius.
        mode: Heating or cooling.

    Returns:
        What was set.
    """
    return f"{room}:{celsius}:{mode}"


def test_schema_and_description_come_from_hints_and_docstring() -> None:
    made = tool_from_function(set_target)
    assert made.name == "set_target"
    assert (
        made.description == "Set a room's target temperature. Rooms are named as on the floor plan."
    )
    assert made.parameters == {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "room": {"type": "string", "description": 'The room, e.g. "kitchen".'},
            "celsius": {"type": "number", "description": "Target in degrees Celsius."},
            "mode": {
                "type": "string",
                "enum": ["heat", "cool"],
                "default": "heat",
                "description": "Heating or cooling.",
            },
        },
        "required": ["room", "celsius"],
    }
    assert made.openai_spec()["function"]["name"] == "set_target"


async def test_invoke_validates_and_names_the_bad_field() -> None:
    made = tool_from_function(set_target)
    assert await made.invoke({"room": "hall", "celsius": 21}) == "hall:21.0:heat"
    with pytest.raises(ToolInputError, match="celsius: Field required"):
        await made.invoke({"room": "hall"})
    with pytest.raises(ToolInputError, match="mode: Input should be 'heat' or 'cool'"):
        await made.invoke({"room": "hall", "celsius": 2, "mode": "boil"})
    with pytest.raises(ToolInputError, match="colour: Extra inputs are not permitted"):
        await made.invoke({"room": "hall", "celsius": 2, "colour": "red"})
    with pytest.raises(ToolInputError, match="must be an object"):
        await made.invoke(["hall"])  # type: ignore[arg-type]


async def test_async_functions_and_approval_predicates() -> None:
    @tool(needs_approval=lambda args: args["celsius"] > 25, read_only=False)
    async def heat(celsius: float) -> float:
        await asyncio.sleep(0)
        return celsius

    made = tool_from_function(heat)
    assert await made.invoke({"celsius": 3}) == 3
    assert made.approval_required({"celsius": 30}) is True
    assert made.approval_required({"celsius": 20}) is False


def test_bad_names_and_variadic_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="tool name"):
        tool_from_function(set_target, name="set target!")

    def variadic(*values: int) -> int:
        return sum(values)

    with pytest.raises(TypeError, match=r"\*args and \*\*kwargs"):
        tool_from_function(variadic)
    with pytest.raises(ValueError, match="type object"):
        Tool("x", "x", {"type": "string"}, fn=print)


class Heater(Agent):
    initial_state: ClassVar[dict[str, float]] = {"target": 18.0}

    @callable(description="Set the heater's target temperature.")
    def set_target(self, celsius: float) -> float:
        self.set_state({"target": celsius})
        return celsius

    @callable
    def target(self) -> float:
        """The current target."""
        return float(self.state["target"])

    @tool(read_only=True)
    def describe(self, verbose: bool = False) -> str:
        """Describe this heater."""
        return "heater" + (" (verbose)" if verbose else "")


def test_agent_tool_methods_are_bound_tools() -> None:
    heater = Heater.__new__(Heater)
    (described,) = agent_tools(heater)
    assert described.name == "describe" and described.read_only
    assert described.parameters["properties"] == {"verbose": {"type": "boolean", "default": False}}


async def test_callable_methods_reach_the_agent_through_the_runtime(tmp_path: Path) -> None:
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path), {"heater": Heater})
    await runtime.start()
    try:
        tools = {t.name: t for t in callable_tools(runtime, "heater", Heater)}
        assert set(tools) == {"heater_set_target", "heater_target"}
        set_tool = tools["heater_set_target"]
        assert set_tool.description == "Set the heater's target temperature."
        assert set_tool.parameters["required"] == ["agent_id", "celsius"]
        assert await set_tool.invoke({"agent_id": "h1", "celsius": "21.5"}) == 21.5
        assert await runtime.get_agent_state("heater", "h1") == {"target": 21.5}
        assert await tools["heater_target"].invoke({"agent_id": "h2"}) == 18.0
        with pytest.raises(ToolInputError, match="agent_id"):
            await set_tool.invoke({"celsius": 3})
        (one,) = [
            t for t in callable_tools(runtime, "heater", Heater, agent_id="h1") if "set" in t.name
        ]
        assert "agent_id" not in one.parameters["properties"]
        assert await one.invoke({"celsius": 19}) == 19.0
        assert await runtime.get_agent_state("heater", "h1") == {"target": 19.0}
    finally:
        await runtime.drain(5)
        await runtime.close()
