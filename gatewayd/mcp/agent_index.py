"""The agents a gateway knows: one SQLite file per agent under `state_dir/agents/<class>/`.

Listing reads each file's stored id (read-only, never through the runtime: no agent is woken)
off the event loop, stopping after `limit` matches; `last_seen` is when the agent last
committed (the newest modification time of its database and WAL files).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gatewayd.agents.storage import stored_agent_id


@dataclass(frozen=True, slots=True)
class KnownAgent:
    agent_class: str
    agent_id: str
    last_seen: str | None  # ISO 8601 UTC


class AgentIndex:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "agents"

    async def find(
        self,
        classes: Iterable[str],
        contains: str = "",
        limit: int = 100,
        keep: Callable[[str], bool] | None = None,
    ) -> tuple[list[KnownAgent], bool]:
        """Agents of `classes` whose id contains `contains` (and, given `keep`, for which
        `keep(agent_id)` is true), sorted by class then id; and whether more matched than
        `limit`."""
        return await asyncio.to_thread(self._list, sorted(classes), contains, limit, keep)

    def _list(
        self,
        classes: list[str],
        contains: str,
        limit: int,
        keep: Callable[[str], bool] | None = None,
    ) -> tuple[list[KnownAgent], bool]:
        found: list[KnownAgent] = []
        for agent_class in classes:
            class_dir = self.root / agent_class
            if not class_dir.is_dir():
                continue
            for path in sorted(class_dir.glob("*/*.sqlite3")):
                agent_id = stored_agent_id(path, timeout_s=1.0)
                if agent_id is None or contains not in agent_id:
                    continue
                if keep is not None and not keep(agent_id):
                    continue
                if len(found) >= limit:
                    return sorted(found, key=_order), True
                found.append(KnownAgent(agent_class, agent_id, last_seen(path)))
        return sorted(found, key=_order), False


def last_seen(path: Path) -> str | None:
    times = []
    for candidate in (path, Path(f"{path}-wal")):
        try:
            times.append(os.stat(candidate).st_mtime)
        except OSError:
            continue
    if not times:
        return None
    return datetime.fromtimestamp(max(times), UTC).isoformat(timespec="seconds")


def _order(agent: KnownAgent) -> tuple[str, str]:
    return (agent.agent_class, agent.agent_id)
