"""Group "devices": the connections open on the gateway (devices, dashboards), when each agent
was last heard from, and commands sent to a device through the durable output path (the
command is an output of a turn of the device's agent: it leaves after that turn commits and,
on transports with durable outputs, is sent again until delivered)."""

from __future__ import annotations

import json
from typing import Any

from gatewayd.agents.storage import agent_db_path
from gatewayd.cluster.operations import SendToConnections
from gatewayd.mcp.agent_index import last_seen
from gatewayd.mcp.catalog import GroupContext, ServedTool
from gatewayd.mcp.groups.common import agent_label, existing_agent, reachable_classes
from gatewayd.tools import ToolError, tool_from_function


def tools(context: GroupContext) -> list[ServedTool]:
    runtime = context.runtime

    async def devices_list(
        agent_class: str | None = None, id_contains: str = "", limit: int = 50
    ) -> dict[str, Any]:
        """List the open device connections (any transport), with the agent each belongs to.

        Args:
            agent_class: Only devices of agents of this class.
            id_contains: Only devices whose agent id contains this text.
            limit: At most this many devices.
        """
        limit = max(1, min(limit, context.max_items))
        classes = set(reachable_classes(context, agent_class))
        rows = [
            {
                "agent_class": key[0],
                "agent_id": key[1],
                "connection_id": conn.id,
                "transport": conn.transport,
                "remote": conn.remote,
                "tags": list(conn.tags),
            }
            for key, conn in runtime.open_connections()
            if key[0] in classes and id_contains in key[1]
        ]
        rows.sort(key=lambda row: (row["agent_class"], row["agent_id"], row["connection_id"]))
        return {"devices": rows[:limit], "truncated": len(rows) > limit}

    async def device_last_seen(agent_class: str, agent_id: str) -> dict[str, Any]:
        """When a device's agent last committed anything (a reading, a command), and its open
        connections.

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id.
        """
        await existing_agent(context, agent_class, agent_id)
        path = agent_db_path(runtime.settings.state_dir, agent_class, agent_id)
        open_now = [
            {"connection_id": conn.id, "transport": conn.transport, "remote": conn.remote}
            for key, conn in runtime.open_connections()
            if key == (agent_class, agent_id)
        ]
        return {"last_seen": last_seen(path), "connections": open_now}

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
