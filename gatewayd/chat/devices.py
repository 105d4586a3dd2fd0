"""Devices as tools: what a chat agent may do to the devices it manages.

    class SiteChat(ChatAgent):
        devices = (
            AgentDevice("thermostat", "room2"),            # its @callable methods
            DeviceCommand(                                 # a raw command to an MQTT/TCP device
                "boiler_mode", "Set the boiler's mode.", "boiler", "b1",
                {"type": "object", "properties": {"mode": {"enum": ["eco", "comfort"]}},
                 "required": ["mode"]},
            ),
        )

`AgentDevice`: the non-streaming `@callable` methods of one agent (the agent that stands for a
device: a thermostat, a meter) as tools named `<prefix>_<method>`, their JSON schemas from the
methods' type hints and docstrings (`gatewayd.tools.callable_tools`); each call is a normal
turn of that agent. `DeviceCommand`: one tool that sends its validated arguments, as a JSON
command, to the device's own connections (MQTT or TCP links of that agent), in a turn of that
agent: the command goes through the agent's durable outbox (written in the turn's
transaction, resent after a crash until the device has it). A tool's `needs_approval` (a bool
or a predicate on the arguments) makes a person approve each call first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gatewayd.tools import Tool, ToolError, ToolInputError, callable_tools
from gatewayd.tools.tool import Approval

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


class DeviceTools(Protocol):
    def tools(self, runtime: Any) -> list[Tool]:
        """The tools, given the agent runtime (`AgentRuntime`: `classes`, `call`...)."""
        ...


def _need_runtime(runtime: Any, what: str) -> Any:
    if runtime is None:
        raise RuntimeError(f"{what}: devices as tools need the agent runtime (none given)")
    return runtime


@dataclass(frozen=True)
class AgentDevice:
    """The `@callable` methods of agent `agent_class`/`agent_id` as tools (see the module doc).
    `methods`: only these (default all); `needs_approval`: overrides every tool's own."""

    agent_class: str
    agent_id: str
    prefix: str | None = None
    methods: Sequence[str] | None = None
    needs_approval: Approval | None = None

    def tools(self, runtime: Any) -> list[Tool]:
        runtime = _need_runtime(runtime, f"device {self.agent_class}/{self.agent_id}")
        cls = runtime.classes.get(self.agent_class)
        if cls is None:
            known = ", ".join(sorted(runtime.classes)) or "none"
            raise ValueError(f"devices: no agent class {self.agent_class!r} (known: {known})")
        prefix = self.prefix or _UNSAFE.sub("_", f"{self.agent_class}_{self.agent_id}")
        tools = callable_tools(
            runtime, self.agent_class, cls, agent_id=self.agent_id, prefix=prefix
        )
        if self.methods is not None:
            wanted = {f"{prefix}_{m}" for m in self.methods}
            missing = wanted - {t.name for t in tools}
            if missing:
                raise ValueError(
                    f"devices: {self.agent_class} has no @callable {sorted(missing)} "
                    f"(it has: {', '.join(t.name for t in tools) or 'none'})"
                )
            tools = [t for t in tools if t.name in wanted]
        if self.needs_approval is not None:
            tools = [replace(t, needs_approval=self.needs_approval) for t in tools]
        return tools


@dataclass(frozen=True)
class DeviceCommand:
    """One tool sending `{"command": name, **arguments}` (JSON) to the open device links of
    agent `agent_class`/`agent_id` (`transport`: only "mqtt" or "tcp" links; None: any
    device link), through that agent's durable outbox. Approval is on by default."""

    name: str
    description: str
    agent_class: str
    agent_id: str
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    transport: str | None = None
    needs_approval: Approval = True

    def tools(self, runtime: Any) -> list[Tool]:
        runtime = _need_runtime(runtime, f"device command {self.name}")
        where = f"{self.agent_class}/{self.agent_id}"
        transports = (self.transport,) if self.transport else ("mqtt", "tcp")
        required = list(self.parameters.get("required", ()))
        name = self.name

        def validate(args: Mapping[str, Any]) -> dict[str, Any]:
            missing = [key for key in required if key not in args]
            if missing:
                raise ToolInputError(f"{name}: missing argument(s) {', '.join(missing)}")
            try:
                json.dumps(dict(args))
            except (TypeError, ValueError) as err:
                raise ToolInputError(f"{name}: arguments are not JSON: {err}") from None
            return dict(args)

        def send_in_turn(agent: Any, command: str) -> dict[str, Any]:
            links = [c for c in agent.get_connections() if c.transport in transports]
            if not links:
                raise ToolError(
                    f"{name}: device {where} has no open {'/'.join(transports)} link; "
                    "the command was not sent"
                )
            for conn in links:
                conn.send(command)
            return {"sent": True, "device": where, "links": len(links)}

        async def send(**args: Any) -> Any:
            command = json.dumps({"command": name, **args}, separators=(",", ":"))
            return await runtime.run_in_agent(
                self.agent_class, self.agent_id, lambda agent: send_in_turn(agent, command)
            )

        return [
            Tool(
                name=name,
                description=self.description,
                parameters=dict(self.parameters),
                fn=send,
                needs_approval=self.needs_approval,
                validate=validate,
            )
        ]
