"""Group "devices": the connections open on the gateway (devices, dashboards), when each agent
was last heard from, and commands sent to a device through the durable output path (the
command is an output of a turn of the device's agent: it leaves after that turn commits and,
on transports with durable outputs, is sent again until delivered)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gatewayd.cluster.operations import (
    AgentLastSeen,
    GroupAnswer,
    OpenConnections,
    SendToConnections,
    ask_group,
)
from gatewayd.mcp.catalog import GroupContext, ServedTool
from gatewayd.mcp.groups.common import agent_label, existing_agent, reachable_classes
from gatewayd.tools import ToolError, tool_from_function


def tools(context: GroupContext) -> list[ServedTool]:
    runtime = context.runtime

    async def devices_list(
        agent_class: str | None = None, id_contains: str = "", limit: int = 50
    ) -> dict[str, Any]:
        """List the open device connections (any transport), with the agent each belongs to
        (in a group of gateways: on every member, each naming it; members that did not answer
        in time are listed in missing_members).

        Args:
            agent_class: Only devices of agents of this class.
            id_contains: Only devices whose agent id contains this text.
            limit: At most this many devices.
        """
        limit = max(1, min(limit, context.max_items))
        classes = reachable_classes(context, agent_class)
        group = await ask_group(runtime, OpenConnections(classes, id_contains))
        rows = _merged(group)
        rows.sort(key=lambda row: (row["agent_class"], row["agent_id"], row["connection_id"]))
        listed: dict[str, Any] = {"devices": rows[:limit], "truncated": len(rows) > limit}
        if group.grouped:
            listed["missing_members"] = group.missing_json()
        return listed

    async def device_last_seen(agent_class: str, agent_id: str) -> dict[str, Any]:
        """When a device's agent last committed anything (a reading, a command), and its open
        connections (in a group of gateways: on every member, each naming it).

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id.
        """
        await existing_agent(context, agent_class, agent_id)
        seen, connections = await asyncio.gather(
            ask_group(runtime, AgentLastSeen(agent_class, agent_id)),
            ask_group(runtime, OpenConnections([agent_class], agent_id=agent_id)),
        )
        open_now = [
            {
                key: row[key]
                for key in ("connection_id", "transport", "remote", "member")
                if key in row
            }
            for row in _merged(connections)
        ]
        times = [t for t in seen.answers.values() if isinstance(t, str)]
        found: dict[str, Any] = {"last_seen": max(times, default=None), "connections": open_now}
        if seen.grouped:
            missing = {**connections.missing, **seen.missing}
            found["missing_members"] = GroupAnswer({}, missing).missing_json()
        return found

    async def device_command_send(
        agent_class: str,
        agent_id: str,
        command: str | dict[str, Any],
        connection_id: str | None = None,
    ) -> dict[str, Any]:
        """Send a command to a device: to each open connection of its agent (or to one),
        as an output of a turn of that agent (durable: it leaves after the commit).

        Args:
            agent_class: The device agent's class.
            agent_id: The device agent's id.
            command: Text, or a JSON object (sent as JSON text).
            connection_id: Only this connection (devices_list shows them).
        """
        await existing_agent(context, agent_class, agent_id)
        text = command if isinstance(command, str) else json.dumps(command)
        sent = await runtime.run_in_agent(
            agent_class, agent_id, SendToConnections(text, connection_id)
        )
        if not sent:
            which = f"connection {connection_id!r}" if connection_id else "connection"
            raise ToolError(f"{agent_label(agent_class, agent_id)} has no open {which}")
        return {"sent_to": sent}

    return [
        ServedTool(tool_from_function(devices_list, read_only=True), "devices"),
        ServedTool(
            tool_from_function(device_last_seen, read_only=True), "devices", class_arg="agent_class"
        ),
        ServedTool(tool_from_function(device_command_send), "devices", class_arg="agent_class"),
    ]


def _merged(group: GroupAnswer) -> list[dict[str, Any]]:
    """Every member's rows, each naming its member (in a group)."""
    rows: list[dict[str, Any]] = []
    for member, answer in group.answers.items():
        rows.extend(row if member is None else {**row, "member": member} for row in answer)
    return rows
