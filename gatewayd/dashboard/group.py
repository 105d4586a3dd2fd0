"""The dashboard's agent and device lists in a group of gateways: every live member's.

The member serving the page asks every live member the questions MCP's `agents_list` and
`devices_list` ask (`cluster.operations.StoredAgents` and `OpenConnections`, through
`RoutedRuntime.ask_members`): each member answers for the agents it serves and the
connections open on it, and each row names that `member`. A member that does not answer in
time is named in `missing` (the page shows it) instead of failing the list. Each answer is
kept for `fresh_s`: the page polls, and an ask reads every member's agent files.

Imports nothing of NATS: it only calls the routed runtime it is handed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gatewayd.cluster.operations import OpenConnections, StoredAgents, ask_group


@dataclass(frozen=True, slots=True)
class GroupListing:
    """Every live member's stored agents and open connections (each row with its `member`),
    whether a member had more agents than asked for, and the members that did not answer."""

    agents: list[dict[str, Any]]
    connections: list[dict[str, Any]]
    truncated: bool
    missing: dict[str, str]

    def missing_json(self) -> list[dict[str, str]]:
        return [{"member": name, "reason": why} for name, why in sorted(self.missing.items())]

    def connections_by_agent(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        found: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in self.connections:
            found.setdefault((row["agent_class"], row["agent_id"]), []).append(row)
        return found


class GroupLists:
    """Asks the group (`routed`: a runtime with `ask_members`) for its agents and
    connections; an answer is reused for `fresh_s`, and one ask in flight is shared."""

    def __init__(self, routed: Any, *, limit: int, fresh_s: float = 2.0) -> None:
        self.routed = routed
        self.limit = limit  # stored agents asked of each member
        self.fresh_s = fresh_s
        self._recent: dict[tuple[Any, ...], tuple[float, asyncio.Future[GroupListing]]] = {}

    async def listing(self, classes: Iterable[str], contains: str = "") -> GroupListing:
        """The group's agents of `classes` (and their connections) whose id contains
        `contains`, in any case."""
        key = (tuple(sorted(classes)), contains)
        now = time.monotonic()
        recent = self._recent.get(key)
        if recent is None or (recent[1].done() and now - recent[0] >= self.fresh_s):
            self._recent = {  # forget what is stale (searches typed on the page)
                k: v for k, v in self._recent.items() if now - v[0] < self.fresh_s
            }
            recent = (now, asyncio.ensure_future(self._ask(list(key[0]), contains)))
            self._recent[key] = recent
        return await asyncio.shield(recent[1])

    async def _ask(self, classes: list[str], contains: str) -> GroupListing:
        stored, connections = await asyncio.gather(
            ask_group(self.routed, StoredAgents(classes, contains, self.limit, ignore_case=True)),
            ask_group(self.routed, OpenConnections(classes, contains, ignore_case=True)),
        )
        agents: list[dict[str, Any]] = []
        truncated = False
        for member, answer in stored.answers.items():
            truncated = truncated or bool(answer["truncated"])
            agents += [{**row, "member": member} for row in answer["agents"]]
        agents.sort(key=lambda row: (row["agent_class"], row["agent_id"]))
        rows = [
            {**row, "member": member}
            for member, answer in connections.answers.items()
            for row in answer
        ]
        return GroupListing(agents, rows, truncated, {**connections.missing, **stored.missing})


def agent_rows(listing: GroupListing, agent_class: str | None) -> list[dict[str, Any]]:
    """The dashboard's agent rows (its single-gateway shape, plus `member`)."""
    connections = listing.connections_by_agent()
    return [
        {
            "class": row["agent_class"],
            "id": row["agent_id"],
            "last_write": epoch(row["last_seen"]),
            "awake": bool(row["awake"]),
            "connections": len(connections.get((row["agent_class"], row["agent_id"]), [])),
            "member": row["member"],
        }
        for row in listing.agents
        if agent_class is None or row["agent_class"] == agent_class
    ]


def device_rows(
    listing: GroupListing, device_transports: tuple[str, ...]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each device agent (stored, or with a device connection open) by (class, id): the
    member serving it, when it last wrote, and its open `device_transports` connections."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for row in listing.agents:
        key = (row["agent_class"], row["agent_id"])
        found[key] = {"member": row["member"], "last_write": epoch(row["last_seen"]), "conns": []}
    for row in listing.connections:
        if row["transport"] not in device_transports:
            continue
        key = (row["agent_class"], row["agent_id"])
        entry = found.setdefault(key, {"member": row["member"], "last_write": None, "conns": []})
        entry["conns"].append(row)
    return dict(sorted(found.items()))


def epoch(iso: str | None) -> float | None:
    """An ISO 8601 time (as `StoredAgents` answers) in epoch seconds (as the page shows)."""
    return None if not iso else datetime.fromisoformat(iso).timestamp()
