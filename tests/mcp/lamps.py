"""Agent classes the MCP tests serve."""

from __future__ import annotations

from typing import Any, ClassVar

from gatewayd.agents import Agent, callable
from gatewayd.tools import tool


class Lamp(Agent):
    initial_state: ClassVar[dict[str, Any]] = {"on": False, "brightness": 0}

    @callable
    @tool
    def switch(self, on: bool, brightness: int = 100) -> dict[str, Any]:
        """Switch the lamp on or off.

        Args:
            on: True to switch it on.
            brightness: 1..100 when on.
        """
        if on and not 1 <= brightness <= 100:
            raise ValueError(f"brightness must be 1..100, got {brightness}")
        self.set_state({"on": on, "brightness": brightness if on else 0})
        return dict(self.state)

    @callable
    @tool(read_only=True)
    def status(self) -> dict[str, Any]:
        """The lamp's state."""
        return dict(self.state)

    fuse_ok: ClassVar[bool] = False

    def replace_bulb(self, payload: Any = None) -> None:
        """A queued job that fails (its item becomes a dead letter) until the fuse is fixed."""
        if not Lamp.fuse_ok:
            raise RuntimeError("the bulb blew a fuse")
        self.set_state({**self.state, "bulb": "new"})

    @callable
    def factory_reset(self) -> str:
        """Not marked for MCP: never served as a tool of its own."""
        self.set_state(dict(self.initial_state))
        return "reset"


class Meter(Agent):
    initial_state: ClassVar[dict[str, Any]] = {"kwh": 0.0}

    @callable
    def add(self, kwh: float) -> float:
        """Add energy (served through the config's mcp.classes list)."""
        self.set_state({"kwh": self.state["kwh"] + kwh})
        return float(self.state["kwh"])
