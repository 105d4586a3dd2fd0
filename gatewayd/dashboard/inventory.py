"""What the dashboard lists: agents (on disk and in memory), one agent in detail, devices.

Agents on disk are found by walking `state_dir/agents/<class>/` (each database stores its
agent's id in `_gw_meta`; ids are cached by file, they never change). The walk runs off the
event loop and is cached for `rescan_s`. In cluster mode the agent and device lists are the
group's (`dashboard.group`: every live member answers for the agents it serves and the
connections open on it, each row names its `member`, and `missing_members` names those that
did not answer). An agent's detail is read in a turn of its own (`run_in_agent` of a named
operation, `cluster.operations.DashboardAgent`: it wakes a hibernated agent, as opening its
page over WebSocket does); in cluster mode that turn runs on the member that serves the
agent, whichever member serves the page, and no copy of the agent is made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from gatewayd.agents.storage import stored_agent_id
from gatewayd.cluster.operations import DashboardAgent, ReplayDeadLetter, agent_exists
from gatewayd.dashboard.group import GroupLists, agent_rows, device_rows

MAX_LISTED = 5000  # agents listed per request; the page searches within them


@dataclass(frozen=True, slots=True)
class AgentFile:
    agent_class: str
    agent_id: str
    path: str
    last_write: float  # mtime of the database or its WAL, whichever is newer


def _last_write(path: str) -> float:
    times = []
    for candidate in (path, path + "-wal"):
        with contextlib.suppress(OSError):
            times.append(os.stat(candidate).st_mtime)
    return max(times, default=0.0)


class Inventory:
    """Agents and devices of one running daemon (`components`: `wiring.Components`)."""

    def __init__(self, components: Any, *, rescan_s: float = 2.0) -> None:
        self.components = components
        self.rescan_s = rescan_s
        self._ids: dict[str, str] = {}  # database path -> agent id
        self._files: list[AgentFile] = []
        self._scanned_at = -1e9
        self._scan_lock = asyncio.Lock()
        self._group: GroupLists | None = None

    @property
    def _group_lists(self) -> GroupLists | None:
        """In cluster mode, the group's lists (asked of every live member); else None."""
        routed = getattr(self.components, "routed_runtime", None)
        if self._group is None and hasattr(routed, "ask_members"):
            self._group = GroupLists(routed, limit=MAX_LISTED, fresh_s=self.rescan_s)
        return self._group

    @property
    def _runtime(self) -> Any:
        return self.components.runtime

    @property
    def _routed(self) -> Any:
        """In cluster mode the runtime whose calls run on the agent's owner (a named
        operation, never code), so that reading an agent here never creates a copy of it."""
        return getattr(self.components, "routed_runtime", None) or self.components.runtime

    def _serves(self, agent_id: str) -> bool:
        """Whether this member serves the agent (always, outside cluster mode): a member
        deletes the files of a partition it gave away, but one not deleted yet is not listed."""
        router = getattr(self.components, "router", None)
        return router is None or router.decide(agent_id).kind == "local"

    # -- agents ------------------------------------------------------------------------------

    async def agent_files(self) -> list[AgentFile]:
        """The agent databases this member holds (and serves, in cluster mode)."""
        async with self._scan_lock:
            if time.monotonic() - self._scanned_at >= self.rescan_s:
                classes = list(self._runtime.classes)
                state_dir = str(self._runtime.settings.state_dir)  # cluster mode: its own
                self._files = await asyncio.to_thread(self._scan, state_dir, classes)
                self._scanned_at = time.monotonic()
            return [f for f in self._files if self._serves(f.agent_id)]

    def _scan(self, state_dir: str, classes: list[str]) -> list[AgentFile]:
        found: list[AgentFile] = []
        for agent_class in classes:
            root = os.path.join(state_dir, "agents", agent_class)
            for folder, _dirs, names in os.walk(root):
                for name in names:
                    if not name.endswith(".sqlite3"):
                        continue
                    path = os.path.join(folder, name)
                    agent_id = self._ids.get(path)
                    if agent_id is None:
                        agent_id = stored_agent_id(path)
                        if agent_id is None:
                            continue  # being created, or not an agent database
                        self._ids[path] = agent_id
                    found.append(AgentFile(agent_class, agent_id, path, _last_write(path)))
        return found

    async def agents(self, query: str = "", agent_class: str | None = None) -> dict[str, Any]:
        """Known agents (on disk or awake), filtered by class and a substring of the id (in
        cluster mode: stored on the members that serve them, of the whole group)."""
        if self._group_lists is not None:
            return await self._group_agents(self._group_lists, query, agent_class)
        awake = set(self._runtime.awake_agents())
        connections: dict[tuple[str, str], int] = {}
        for key, _conn in self._runtime.open_connections():
            connections[key] = connections.get(key, 0) + 1
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for f in await self.agent_files():
            rows[(f.agent_class, f.agent_id)] = {
                "class": f.agent_class,
                "id": f.agent_id,
                "last_write": f.last_write,
            }
        for key in awake:
            rows.setdefault(key, {"class": key[0], "id": key[1], "last_write": None})
        needle = query.lower()
        listed = [
            {**row, "awake": key in awake, "connections": connections.get(key, 0)}
            for key, row in sorted(rows.items())
            if (agent_class is None or key[0] == agent_class) and needle in key[1].lower()
        ]
        return {
            "classes": sorted(self._runtime.classes),
            "total": len(rows),
            "awake": len(awake),
            "hibernated": len(rows) - len(awake & rows.keys()),
            "agents": listed[:MAX_LISTED],
            "truncated": len(listed) > MAX_LISTED,
        }

    async def _group_agents(
        self, lists: GroupLists, query: str, agent_class: str | None
    ) -> dict[str, Any]:
        classes = sorted(self._runtime.classes)
        wanted = [c for c in classes if agent_class is None or c == agent_class]
        # The totals are the group's (as without a group); the rows those that match.
        everything, found = await asyncio.gather(
            lists.listing(classes), lists.listing(wanted, query)
        )
        listed = agent_rows(found, agent_class)
        awake = sum(1 for row in everything.agents if row["awake"])
        return {
            "classes": classes,
            "total": len(everything.agents),
            "awake": awake,
            "hibernated": len(everything.agents) - awake,
            "agents": listed[:MAX_LISTED],
            "truncated": found.truncated or len(listed) > MAX_LISTED,
            "missing_members": found.missing_json(),
        }

    async def exists(self, agent_class: str, agent_id: str) -> bool:
        """The agent is awake here or has a database where it is served (in a group, the
        owner answers): looking at it must not create it."""
        if self._runtime.is_awake(agent_class, agent_id):
            return True
        try:
            return await agent_exists(self._routed, agent_class, agent_id)
        except ValueError:  # not a valid id at all
            return False

    async def agent(self, agent_class: str, agent_id: str, logs: Any = None) -> dict[str, Any]:
        """One agent: state, schedules, queue, dead letters, failures, connections, errors
        (read in a turn on the member that serves it; `logs` are this member's)."""
        cls = self._runtime.classes[agent_class]
        detail = await self._routed.run_in_agent(agent_class, agent_id, DashboardAgent())
        errors = (
            []
            if logs is None
            else [e.to_json() for e in logs.about(agent_class, agent_id)[-20:][::-1]]
        )
        for item in detail["dead_letters"]:
            if item["last_error"]:
                errors.append(
                    {
                        "at": item["dead_at"],
                        "level": "DEAD",
                        "logger": "queue",
                        "message": f"{item['method']}: {item['last_error']}",
                    }
                )
        for failure in detail["schedule_failures"]:
            errors.append(
                {
                    "at": failure["failed_at"],
                    "level": "FAILED",
                    "logger": "schedule",
                    "message": f"{failure['method']}: {failure['error']}",
                }
            )
        errors.sort(key=lambda e: e["at"] or 0, reverse=True)
        return {
            "class": agent_class,
            "id": agent_id,
            "chat": any(c.__name__ == "ChatAgent" for c in cls.__mro__),
            "callables": _callables(cls),
            "awake": True,  # the read above ran as one of its turns
            **detail,
            "errors": errors[:50],
        }

    async def replay(self, agent_class: str, agent_id: str, item_id: str) -> bool:
        """Put a dead letter back in the agent's queue (as a new item, same method and
        payload); False when there is no such dead letter."""
        replayed = await self._routed.run_in_agent(agent_class, agent_id, ReplayDeadLetter(item_id))
        return bool(replayed)

    # -- devices -----------------------------------------------------------------------------

    async def devices(self) -> dict[str, Any]:
        """Agents behind MQTT routes and the TCP listener: connected now or seen before."""
        config = self.components.config
        device_classes: dict[str, str] = {}
        admissions: dict[str, list[_Admission]] = {}
        if config.mqtt.enabled:
            for route in config.mqtt.routes:
                device_classes.setdefault(route.agent_class, "mqtt")
                admissions.setdefault(route.agent_class, []).append(_Admission.of(route))
        if config.listeners.binary.enabled:
            device_classes.setdefault(config.listeners.binary.agent_class, "tcp")
        if self._group_lists is not None:
            listing = await self._group_lists.listing(device_classes)
            devices = [
                _device_row(key, device_classes, admissions, **entry)
                for key, entry in device_rows(listing, ("mqtt", "tcp")).items()
            ]
            return {
                "devices": devices,
                "mqtt": self._mqtt_status(),
                "missing_members": listing.missing_json(),
            }
        links: dict[tuple[str, str], list[Any]] = {}
        for key, conn in self._runtime.open_connections():
            if conn.transport in ("mqtt", "tcp"):
                links.setdefault(key, []).append(conn)
        seen: dict[tuple[str, str], float | None] = {
            (f.agent_class, f.agent_id): f.last_write
            for f in await self.agent_files()
            if f.agent_class in device_classes
        }
        for key in links:
            seen.setdefault(key, None)
        devices = [
            _device_row(
                key,
                device_classes,
                admissions,
                last_write=last_write,
                conns=[{"transport": c.transport, "remote": c.remote} for c in links.get(key, [])],
            )
            for key, last_write in sorted(seen.items())
        ]
        return {"devices": devices, "mqtt": self._mqtt_status()}

    def _mqtt_status(self) -> dict[str, Any] | None:
        config = self.components.config
        mqtt = self.components.transports.get("mqtt")
        return (
            None
            if mqtt is None
            else {
                "state": mqtt.state,
                "broker": mqtt.broker,
                "refused_not_allowed": mqtt.stats.extra.get("not_allowed", 0),
                "routes": [
                    {
                        "topic": r.topic,
                        "class": r.agent_class,
                        "allow_list": r.allowed_ids_file is not None
                        or r.allowed_id_pattern is not None,
                    }
                    for r in config.mqtt.routes
                ],
            }
        )


def _device_row(
    key: tuple[str, str],
    device_classes: dict[str, str],
    admissions: dict[str, list[_Admission]],
    *,
    last_write: float | None,
    conns: list[dict[str, Any]],
    member: str | None = None,
) -> dict[str, Any]:
    """One device as the page lists it (`conns`: its open device connections, each with its
    `transport` and `remote`); with `member` in cluster mode (the member that serves it)."""
    agent_class, agent_id = key
    transports = sorted({c["transport"] for c in conns}) or [device_classes.get(agent_class, "?")]
    row = {
        "class": agent_class,
        "id": agent_id,
        "transports": transports,
        "connected": bool(conns),
        "remote": [c["remote"] for c in conns],
        "last_message": last_write,
        "allowed": _allowed(agent_id, transports, admissions.get(agent_class, [])),
    }
    if member is not None:
        row["member"] = member
    return row


@dataclass(frozen=True, slots=True)
class _Admission:
    ids: frozenset[str] | None
    pattern: re.Pattern[str] | None

    @classmethod
    def of(cls, route: Any) -> _Admission:
        ids = None
        if route.allowed_ids_file is not None:
            from protocols.mqtt_settings import load_id_list

            with contextlib.suppress(OSError, ValueError):
                ids = load_id_list(str(route.allowed_ids_file))
        pattern = None if route.allowed_id_pattern is None else re.compile(route.allowed_id_pattern)
        return cls(ids, pattern)

    def verdict(self, agent_id: str) -> str | None:
        """ "listed", "pattern", "not allowed", or None when the route admits every id."""
        if self.ids is None and self.pattern is None:
            return None
        if self.ids is not None and agent_id in self.ids:
            return "listed"
        if self.pattern is not None and self.pattern.fullmatch(agent_id):
            return "pattern"
        return "not allowed"


def _allowed(agent_id: str, transports: list[str], admissions: list[_Admission]) -> str:
    if "tcp" in transports and "mqtt" not in transports:
        return "authenticated (device secret)"
    verdicts = [a.verdict(agent_id) for a in admissions]
    if not verdicts or any(v is None for v in verdicts):
        return "open (no allow-list)"
    for wanted in ("listed", "pattern"):
        if wanted in verdicts:
            return f"allowed ({'in the list' if wanted == 'listed' else 'matches the pattern'})"
    return "not allowed"


def _callables(cls: type) -> list[dict[str, Any]]:
    """The class's `@callable` methods (what a client may call), by name."""
    found = []
    for name in sorted(dir(cls)):
        info = getattr(getattr(cls, name, None), "__gw_callable__", None)
        if info is not None and not name.startswith("_"):
            found.append(
                {"name": name, "streaming": info.streaming, "description": info.description}
            )
    return found
