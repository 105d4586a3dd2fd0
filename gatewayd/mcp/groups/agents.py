"""Group "agents": find agents, read their state, call their methods."""

from __future__ import annotations

from typing import Any

from gatewayd.cluster.operations import StoredAgents, ask_group
from gatewayd.mcp.catalog import GroupContext, ServedTool
from gatewayd.mcp.groups.common import existing_agent, known_class, reachable_classes
from gatewayd.mcp.jsonable import jsonable
from gatewayd.tools import tool_from_function


def tools(context: GroupContext) -> list[ServedTool]:
    async def agent_classes_list() -> list[dict[str, Any]]:
        """The agent classes this token may reach, each with its callable methods (call them
        with agent_call, or with the class's own <class>_<method> tools)."""
        classes = []
        for name in reachable_classes(context, None):
            cls = context.runtime.classes[name]
            methods = sorted(
                attr
                for attr in dir(cls)
                if not attr.startswith("_") and hasattr(getattr(cls, attr), "__gw_callable__")
            )
            classes.append({"agent_class": name, "methods": methods})
        return classes

    async def agents_list(
        agent_class: str | None = None, id_contains: str = "", limit: int = 50
    ) -> dict[str, Any]:
        """List known agents (those with stored state), by class, optionally only those whose
        id contains a text. Start here to find an agent id. In a group of gateways: the
        agents of every member, each naming the member that serves it; members that did not
        answer in time are listed in missing_members.

        Args:
            agent_class: Only agents of this class (default: every class you may reach).
            id_contains: Only agents whose id contains this text.
            limit: At most this many agents.
        """
        limit = max(1, min(limit, context.max_items))
        classes = reachable_classes(context, agent_class)
        group = await ask_group(context.runtime, StoredAgents(classes, id_contains, limit))
        rows: list[dict[str, Any]] = []
        more = False
        for member, answer in group.answers.items():
            more = more or bool(answer["truncated"])
            for row in answer["agents"]:
                rows.append(row if member is None else {**row, "member": member})
        rows.sort(key=lambda row: (row["agent_class"], row["agent_id"]))
        listed: dict[str, Any] = {"agents": rows[:limit], "truncated": more or len(rows) > limit}
        if group.grouped:
            listed["missing_members"] = group.missing_json()
        return listed

    async def agent_state_get(agent_class: str, agent_id: str) -> Any:
        """The current (committed) state of one agent.

        Args:
            agent_class: The agent's class (agents_list shows them).
            agent_id: The agent's id.
        """
        await existing_agent(context, agent_class, agent_id)
        return jsonable(await context.runtime.get_agent_state(agent_class, agent_id))

    async def agent_call(
        agent_class: str, agent_id: str, method: str, args: dict[str, Any] | None = None
    ) -> Any:
        """Call a @callable method of an agent (as one turn of that agent) and return its
        result. agent_classes_list shows each class's methods.

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id (an agent that does not exist yet is created).
            method: The method's name.
            args: Its keyword arguments.
        """
        known_class(context, agent_class)
        return jsonable(await context.runtime.call(agent_class, agent_id, method, **(args or {})))

    return [
        ServedTool(tool_from_function(agent_classes_list, read_only=True), "agents"),
        ServedTool(tool_from_function(agents_list, read_only=True), "agents"),
        ServedTool(
            tool_from_function(agent_state_get, read_only=True), "agents", class_arg="agent_class"
        ),
        ServedTool(tool_from_function(agent_call), "agents", class_arg="agent_class"),
    ]
