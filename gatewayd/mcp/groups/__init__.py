"""The built-in tool groups an operator enables in `[mcp] tool_groups`, each small and named
`<resource>_<verb>` so that a model picks the right tool."""

from __future__ import annotations

from gatewayd.mcp.catalog import GroupBuilder
from gatewayd.mcp.groups import agents, devices, models, observability, schedules

GROUPS: dict[str, GroupBuilder] = {
    "agents": agents.tools,
    "devices": devices.tools,
    "schedules": schedules.tools,
    "observability": observability.tools,
    "models": models.tools,
}
