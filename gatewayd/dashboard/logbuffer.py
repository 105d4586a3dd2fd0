"""The last warnings and errors the daemon logged, kept in memory for the dashboard."""

from __future__ import annotations

import logging
import threading
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
        self._guard = threading.Lock()  # records may come from the commit threads

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        raw = record.args if isinstance(record.args, tuple) else ()
        entry = LogEntry(
            record.created, record.levelname, record.name, message, tuple(map(str, raw))
        )
        with self._guard:
            self.entries.append(entry)

    def _copy(self) -> list[LogEntry]:
        with self._guard:
            return list(self.entries)

    def recent(self, limit: int = 50) -> list[LogEntry]:
        """The newest `limit` entries, newest first."""
        return self._copy()[-limit:][::-1]

    def about(self, agent_class: str, agent_id: str, limit: int = 20) -> list[LogEntry]:
        """The newest entries logged about one agent (its class and id among the record's
        arguments, as the runtime logs them), newest first."""
        found = [e for e in self._copy() if e.about(agent_class, agent_id)]
        return found[-limit:][::-1]
