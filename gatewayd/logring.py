"""`LogRing`: the daemon's last log records in memory, for the operator's views (the
dashboard's recent errors, MCP's observability tools). A logging handler, bounded, safe to
feed from any thread (records also come from the commit threads)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class LogEntry:
    at: float  # time.time() of the record
    levelno: int
    level: str  # "WARNING", "ERROR" ...
    logger: str
    message: str  # formatted, with the exception's type and text when the record had one
    args: tuple[str, ...]  # the record's arguments as text: tells which agent it is about

    @property
    def time(self) -> str:
        return datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds")

    def about(self, agent_class: str, agent_id: str) -> bool:
        """Logged about this agent: its class and id among the record's arguments, as the
        runtime logs them (an id that merely starts the same does not count)."""
        return agent_class in self.args and agent_id in self.args

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "level": self.level, "logger": self.logger, "message": self.message}


class LogRing(logging.Handler):
    """Keeps the last `capacity` records at `level` or above."""

    def __init__(self, capacity: int = 500, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self._entries: deque[LogEntry] = deque(maxlen=max(capacity, 1))
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging: keep the raw text
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            message = f"{message} ({type(err).__name__}: {err})"
        raw = record.args if isinstance(record.args, tuple) else ()
        entry = LogEntry(
            record.created,
            record.levelno,
            record.levelname,
            record.name,
            message,
            tuple(map(str, raw)),
        )
        with self._guard:
            self._entries.append(entry)

    def entries(self, *, min_level: int = logging.NOTSET, contains: str = "") -> list[LogEntry]:
        """The kept entries at `min_level` or above whose message contains `contains`,
        oldest first."""
        with self._guard:
            kept = list(self._entries)
        return [e for e in kept if e.levelno >= min_level and contains in e.message]

    def about(self, agent_class: str, agent_id: str) -> list[LogEntry]:
        """The kept entries logged about one agent, oldest first."""
        return [e for e in self.entries() if e.about(agent_class, agent_id)]

    def install(self) -> None:
        logging.getLogger().addHandler(self)

    def remove(self) -> None:
        logging.getLogger().removeHandler(self)
