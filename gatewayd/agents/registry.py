"""`ConnectionRegistry`: the open connections of every agent, by link id and by agent.

Connections belong to the runtime, not to agent instances, so they outlive hibernation. Only
the event loop touches the registry. Imports nothing of the runtime but `Connection`.
"""

from __future__ import annotations

from collections.abc import Collection

from gatewayd.agents.connection import Connection

AgentKey = tuple[str, str]


class ConnectionRegistry:
    """Every registered connection, found by link id or by its agent's key."""

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_agent: dict[AgentKey, dict[str, Connection]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, link_id: str) -> bool:
        return link_id in self._by_id

    def get(self, link_id: str) -> Connection | None:
        return self._by_id.get(link_id)

    def register(self, key: AgentKey, conn: Connection) -> None:
        self._by_id[conn.id] = conn
        self._by_agent.setdefault(key, {})[conn.id] = conn

    def unregister(self, conn: Connection) -> None:
        self._by_id.pop(conn.id, None)
        route = conn.link.route
        key = (route.agent_class, route.agent_id)
        conns = self._by_agent.get(key)
        if conns is not None:
            conns.pop(conn.id, None)
            if not conns:
                del self._by_agent[key]

    def registered(self, key: AgentKey) -> Collection[Connection]:
        """Every registered connection of the agent `key`, closed by the peer or not (a live
        view: do not register or unregister while iterating it)."""
        conns = self._by_agent.get(key)
        return conns.values() if conns else ()

    def open_of(self, key: AgentKey) -> list[Connection]:
        """The connections of the agent `key` that are still open."""
        conns = self._by_agent.get(key)
        return [c for c in conns.values() if not c.closed] if conns else []

    def all_open(self) -> list[tuple[AgentKey, Connection]]:
        """Every open connection with its agent's key."""
        return [
            (key, conn)
            for key, conns in self._by_agent.items()
            for conn in conns.values()
            if not conn.closed
        ]
