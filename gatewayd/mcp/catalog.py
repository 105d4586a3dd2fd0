"""The tools the gateway serves over MCP: built-in groups first (discovery before actions),
then each agent class's `@callable` methods marked for MCP.

A method is marked with `@tool` (from `gatewayd.tools`) next to `@callable`, or named in the
config (`[mcp.classes] thermostat = ["set_target"]`). It is served as `<class>_<method>` with an
`agent_id` argument, and each call is a turn of that agent (`runtime.call`). A tool changes
things unless marked `@tool(read_only=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gatewayd.logring import LogRing
from gatewayd.mcp.agent_index import AgentIndex
from gatewayd.tools import Tool, callable_tools
from gatewayd.tools.tool import tool_marker


@dataclass(frozen=True, slots=True)
class ServedTool:
    tool: Tool
    group: str  # a built-in group's name, or "class:<name>"
    agent_class: str | None = None  # the one agent class it reaches
    class_arg: str | None = None  # or: the argument that names the class it reaches

    @property
    def name(self) -> str:
        return self.tool.name


@dataclass(slots=True)
class GroupContext:
    """What the built-in groups reach: the daemon's runtime, engine and config."""

    runtime: Any
    engine: Any
    config: Any
    index: AgentIndex
    logs: LogRing | None
    max_items: int
    generators: Mapping[str, Any]


GroupBuilder = Callable[[GroupContext], list[ServedTool]]


def class_tools(
    runtime: Any, classes: Mapping[str, type], configured: Mapping[str, Sequence[str]]
) -> list[ServedTool]:
    """The marked `@callable` methods of every class, as `<class>_<method>` tools."""
    check_configured_methods(classes, configured)
    served: list[ServedTool] = []
    for class_name, cls in classes.items():
        listed = set(configured.get(class_name, ()))
        for tool in callable_tools(runtime, class_name, cls):
            method = tool.name[len(class_name) + 1 :]
            if method in listed or tool_marker(getattr(cls, method)) is not None:
                served.append(ServedTool(tool, f"class:{class_name}", agent_class=class_name))
    return served


def check_configured_methods(
    classes: Mapping[str, type], configured: Mapping[str, Sequence[str]]
) -> None:
    """ValueError naming `mcp.classes` entries that are not `@callable` methods."""
    for class_name, methods in configured.items():
        cls = classes.get(class_name)
        if cls is None:
            continue  # the config's own validation names unknown classes
        unknown = set(methods) - {
            attr for attr in dir(cls) if hasattr(getattr(cls, attr, None), "__gw_callable__")
        }
        if unknown:
            raise ValueError(
                f"mcp.classes.{class_name}: {', '.join(sorted(unknown))} "
                f"{'is not a @callable method' if len(unknown) == 1 else 'are not @callable methods'}"
                f" of {cls.__module__}.{cls.__qualname__}"
            )


def build_catalog(
    context: GroupContext,
    groups: Sequence[str],
    configured: Mapping[str, Sequence[str]],
) -> list[ServedTool]:
    from gatewayd.mcp.groups import GROUPS

    served: list[ServedTool] = []
    for group in groups:
        served.extend(GROUPS[group](context))
    served.extend(class_tools(context.runtime, context.runtime.classes, configured))
    names = [s.name for s in served]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"mcp: two tools are named {', '.join(duplicates)}")
    return served
