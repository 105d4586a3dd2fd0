"""An agent's tools: its `@tool` methods, and any agent class's `@callable` methods as tools
that reach that agent through the runtime (devices as tools, MCP's `<class>_<method>`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol

from gatewayd.tools.schema import tool_from_function
from gatewayd.tools.tool import Tool, ToolInputError, tool_marker


class CallsAgents(Protocol):
    """What `callable_tools` needs of the agent runtime."""

    async def call(
        self, agent_class: str, agent_id: str, method: str, *args: Any, **kw: Any
    ) -> Any: ...


def agent_tools(agent: object) -> list[Tool]:
    """The methods of `agent` marked `@tool`, bound to it, in definition order."""
    tools = []
    for attr in _methods_in_order(type(agent)):
        if tool_marker(getattr(type(agent), attr)) is not None:
            tools.append(tool_from_function(getattr(agent, attr)))
    return tools


def callable_tools(
    runtime: CallsAgents,
    class_name: str,
    agent_class: type,
    *,
    agent_id: str | None = None,
    prefix: str | None = None,
) -> list[Tool]:
    """One tool per non-streaming `@callable` method of `agent_class`, named
    `<prefix>_<method>` (prefix defaults to `class_name`). Each call is a normal turn of the
    agent (`runtime.call`). With `agent_id` the tools act on that one agent; without it each
    tool takes a required `agent_id` argument."""
    tools = []
    for attr in _methods_in_order(agent_class):
        method = getattr(agent_class, attr)
        info = getattr(method, "__gw_callable__", None)
        if info is None or info.streaming:
            continue
        base = tool_from_function(
            method, name=f"{prefix or class_name}_{attr}", description=info.description or None
        )
        tools.append(_through_runtime(runtime, class_name, attr, base, agent_id))
    return tools


def _through_runtime(
    runtime: CallsAgents, class_name: str, method: str, base: Tool, agent_id: str | None
) -> Tool:
    parameters = dict(base.parameters)
    if agent_id is None:
        properties = {
            "agent_id": {"type": "string", "description": f"Which {class_name} agent."},
            **parameters.get("properties", {}),
        }
        parameters["properties"] = properties
        parameters["required"] = ["agent_id", *parameters.get("required", [])]

    def validate(args: Mapping[str, Any]) -> dict[str, Any]:
        args = dict(args)
        target = agent_id
        if target is None:
            target = args.pop("agent_id", None)
            if not isinstance(target, str) or not target:
                raise ToolInputError(f"{base.name}: agent_id: a non-empty string is required")
        return {"__agent_id": target, **base.check(args)}

    async def call(**args: Any) -> Any:
        target = args.pop("__agent_id")
        return await runtime.call(class_name, target, method, **args)

    return Tool(
        name=base.name,
        description=base.description,
        parameters=parameters,
        fn=call,
        needs_approval=base.needs_approval,
        read_only=base.read_only,
        validate=validate,
    )


def _methods_in_order(cls: type) -> list[str]:
    """Attribute names of `cls`'s functions, base classes first, each in definition order."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            if inspect.isfunction(value) and attr not in names:
                names.append(attr)
    return names
