"""Helpers the groups share: which classes the caller may reach, and whether an agent exists
(reading tools never create an agent by asking about it)."""

from __future__ import annotations

from typing import Any

from gatewayd.cluster.operations import agent_exists
from gatewayd.mcp.access import AccessDenied, caller, check_class
from gatewayd.mcp.catalog import GroupContext
from gatewayd.tools import ToolError


def reachable_classes(context: GroupContext, agent_class: str | None) -> list[str]:
    """`[agent_class]` (checked) or every configured class the caller may reach."""
    token = caller()
    if agent_class is not None:
        known_class(context, agent_class)
        check_class(token, agent_class)
        return [agent_class]
    return sorted(name for name in context.runtime.classes if token.allows_class(name))


def known_class(context: GroupContext, agent_class: str) -> None:
    if agent_class not in context.runtime.classes:
        known = ", ".join(sorted(context.runtime.classes)) or "none"
        raise ToolError(f"no agent class {agent_class!r} (configured: {known})")


async def existing_agent(context: GroupContext, agent_class: str, agent_id: str) -> None:
    """`ToolError` unless the agent has stored state (in cluster mode, where it is served)."""
    known_class(context, agent_class)
    try:
        exists = await agent_exists(context.runtime, agent_class, agent_id)
    except ValueError as err:
        raise ToolError(f"bad agent id: {err}") from None
    if not exists:
        raise ToolError(f"no agent {agent_class}/{agent_id!r} (agents_list shows the known ones)")


def require_all_classes(what: str) -> None:
    token = caller()
    if not token.allows_class("*"):
        raise AccessDenied(
            f"token {token.name!r} reaches only some agent classes: {what} needs all"
        )


def agent_label(agent_class: str, agent_id: str) -> str:
    return f"{agent_class}/{agent_id!r}"


def clip(items: list[Any], limit: int, max_items: int) -> tuple[list[Any], bool]:
    limit = max(1, min(limit, max_items))
    return items[:limit], len(items) > limit
