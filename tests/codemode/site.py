"""A site of 50 thermostat agents and its tools: the Code Mode task of issue 12 ("read every
thermostat, and for those below 19 °C raise the target by 1 °C, then report the rooms
changed"). Used by tests/codemode and bench/codemode.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from gatewayd.tools import Tool, callable_tools, tool_from_function

DEVICES = 50
COLD_BELOW_C = 19.0
TASK = (
    "Read every thermostat, and for those below 19 °C raise the target by 1 °C, "
    "then report the rooms changed."
)

# What a model writes for the task in Code Mode (the scripted model's program).
PROGRAM = """async () => {
  const ids = await codemode.thermostats_list();
  const changed = [];
  for (const id of ids) {
    const t = await codemode.thermostat_read({ agent_id: id });
    if (t.temperature_c < 19) {
      await codemode.thermostat_set_target({ agent_id: id, target_c: t.target_c + 1 });
      changed.push(t.room);
    }
  }
  return changed;
}"""


class Reading(TypedDict):
    room: str
    temperature_c: float
    target_c: float


class SiteThermostat(Agent):
    initial_state: ClassVar[dict[str, Any]] = {"room": "", "temperature_c": 0.0, "target_c": 0.0}

    @callable
    def read(self) -> dict[str, Any]:
        """Read this thermostat: {room, temperature_c, target_c} (temperatures in °C)."""
        return dict(self.state)

    @callable
    def set_target(self, target_c: float) -> float:
        """Set this thermostat's target temperature.

        Args:
            target_c: The new target, in °C.
        """
        self.set_state({**self.state, "target_c": target_c})
        return target_c

    @callable
    def install(self, room: str, temperature_c: float, target_c: float) -> None:
        self.set_state({"room": room, "temperature_c": temperature_c, "target_c": target_c})


def device_id(i: int) -> str:
    return f"t{i + 1:02d}"


def seeded(i: int) -> tuple[str, float, float]:
    """Room, temperature and target of device `i`: 17.0 to 21.9 °C, target 20 °C."""
    return f"room-{i + 1:02d}", round(17.0 + (i * 7 % 50) / 10, 1), 20.0


def expected_rooms() -> list[str]:
    return [seeded(i)[0] for i in range(DEVICES) if seeded(i)[1] < COLD_BELOW_C]


class Site:
    def __init__(self, runtime: AgentRuntime) -> None:
        self.runtime = runtime
        ids = [device_id(i) for i in range(DEVICES)]

        async def thermostats_list() -> list[str]:
            """List the ids of every thermostat on the site."""
            return ids

        through_agents = [
            t
            for t in callable_tools(runtime, "thermostat", SiteThermostat)
            if t.name in ("thermostat_read", "thermostat_set_target")
        ]
        self.tools: list[Tool] = [tool_from_function(thermostats_list), *through_agents]

    async def targets(self) -> dict[str, float]:
        return {
            device_id(i): (await self.runtime.get_agent_state("thermostat", device_id(i)))[
                "target_c"
            ]
            for i in range(DEVICES)
        }


@asynccontextmanager
async def site(state_dir: Path) -> AsyncIterator[Site]:
    runtime = AgentRuntime(AgentSettings(state_dir=state_dir), {"thermostat": SiteThermostat})
    await runtime.start()
    try:
        for i in range(DEVICES):
            room, temperature, target = seeded(i)
            await runtime.call("thermostat", device_id(i), "install", room, temperature, target)
        yield Site(runtime)
    finally:
        await runtime.drain(5)
        await runtime.close()
