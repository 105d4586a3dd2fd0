"""The last warnings and errors the daemon logged, kept in memory for the dashboard."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LogEntry:
    at: float
    level: str
    logger: str
    message: str
    args: tuple[str, ...]  # the record's arguments as text: tells which agent it is about

    def about(self, agent_class: str, agent_id: str) -> bool:
        return agent_class in self.args and agent_id in self.args

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "level": self.level, "logger": self.logger, "message": self.message}


class LogBuffer(logging.Handler):
    """A logging handler keeping the last `capacity` records at `level` or above."""

    def __init__(self, capacity: int = 500, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.entries: deque[LogEntry] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        raw = record.args if isinstance(record.args, tuple) else ()
        self.entries.append(
            LogEntry(record.created, record.levelname, record.name, message, tuple(map(str, raw)))
        )

    def recent(self, limit: int = 50) -> list[LogEntry]:
        return list(self.entries)[-limit:][::-1]

    def about(self, agent_class: str, agent_id: str, limit: int = 20) -> list[LogEntry]:
        found = [e for e in self.entries if e.about(agent_class, agent_id)]
        return found[-limit:][::-1]
