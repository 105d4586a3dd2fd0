"""Group "observability": current metric values (the Prometheus registry the gateway exports
on /metrics), and recent warnings, errors and log lines, optionally those naming one agent."""

from __future__ import annotations

import logging
from typing import Any, Literal

from prometheus_client import REGISTRY

from gatewayd.mcp.access import caller, check_class
from gatewayd.mcp.catalog import GroupContext, ServedTool
from gatewayd.mcp.groups.common import known_class, require_all_classes
from gatewayd.tools import ToolError, tool_from_function

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def tools(context: GroupContext) -> list[ServedTool]:
    def lines(
        agent_class: str | None, agent_id: str | None, min_level: int, contains: str, limit: int
    ) -> list[dict[str, Any]]:
        if context.logs is None:
            raise ToolError("no log lines are kept: set mcp.log_lines above 0")
        if agent_class is None:
            if agent_id is not None:
                raise ToolError("agent_id needs agent_class")
            require_all_classes("log lines of every agent")
            picked = context.logs.entries(min_level=min_level, contains=contains)
        else:
            known_class(context, agent_class)
            check_class(caller(), agent_class)
            names = (
                (f"{agent_class}/{agent_id!r}", f"{agent_class}/{agent_id}")
                if agent_id is not None
                else (f"{agent_class}/",)
            )
            picked = [
                line
                for line in context.logs.entries(min_level=min_level, contains=contains)
                if any(name in line.message for name in names)
            ]
        limit = max(1, min(limit, context.max_items))
        return [
            {"time": ln.time, "level": ln.level.lower(), "logger": ln.logger, "message": ln.message}
            for ln in picked[-limit:]
        ]

    async def metrics_get(name_prefix: str = "gatewayd_", limit: int = 200) -> dict[str, Any]:
        """Current values of the gateway's metrics (what /metrics exports), by name prefix:
        e.g. "gatewayd_agent_" for turns and commits, "gatewayd_mqtt_" for the broker link.

        Args:
            name_prefix: Only samples whose name starts with this.
            limit: At most this many samples.
        """
        samples = []
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.name.startswith(name_prefix):
                    samples.append(
                        {"name": sample.name, "labels": dict(sample.labels), "value": sample.value}
                    )
        limit = max(1, min(limit, context.max_items))
        return {"samples": samples[:limit], "truncated": len(samples) > limit}

    async def errors_recent(
        agent_class: str | None = None, agent_id: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """The most recent warnings and errors the gateway logged, oldest first; with an agent,
        only those naming it.

        Args:
            agent_class: Only lines naming agents of this class.
            agent_id: Only lines naming this agent (with agent_class).
            limit: At most this many lines.
        """
        return lines(agent_class, agent_id, logging.WARNING, "", limit)

    async def logs_recent(
        agent_class: str | None = None,
        agent_id: str | None = None,
        level: Literal["debug", "info", "warning", "error"] = "info",
        contains: str = "",
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """The most recent log lines at a level or above, oldest first; with an agent, only
        those naming it.

        Args:
            agent_class: Only lines naming agents of this class.
            agent_id: Only lines naming this agent (with agent_class).
            level: The lowest level shown.
            contains: Only lines containing this text.
            limit: At most this many lines.
        """
        return lines(agent_class, agent_id, _LEVELS[level], contains, limit)

    return [
        ServedTool(tool_from_function(metrics_get, read_only=True), "observability"),
        ServedTool(tool_from_function(errors_recent, read_only=True), "observability"),
        ServedTool(tool_from_function(logs_recent, read_only=True), "observability"),
    ]
