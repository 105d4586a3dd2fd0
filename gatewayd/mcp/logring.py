"""`LogRing`: the last N log records in memory, for the observability tools (recent errors and
log lines, by agent). A logging handler on the root logger while the MCP feature runs."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class LogLine:
    time: str
    level: str
    logger: str
    message: str


class LogRing(logging.Handler):
    def __init__(self, capacity: int) -> None:
        super().__init__(logging.DEBUG)
        self._lines: deque[tuple[int, LogLine]] = deque(maxlen=max(capacity, 1))
        self._guard = threading.Lock()  # records may come from the commit threads

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw text
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            message = f"{message} ({type(err).__name__}: {err})"
        line = LogLine(
            datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            record.levelname.lower(),
            record.name,
            message,
        )
        with self._guard:
            self._lines.append((record.levelno, line))

    def recent(
        self, *, min_level: int = logging.INFO, contains: str = "", limit: int = 50
    ) -> list[LogLine]:
        """The newest `limit` lines at `min_level` or above whose text contains `contains`,
        oldest first."""
        with self._guard:
            lines = list(self._lines)
        picked = [line for level, line in lines if level >= min_level and contains in line.message]
        return picked[-limit:] if limit > 0 else []

    def install(self) -> None:
        logging.getLogger().addHandler(self)

    def remove(self) -> None:
        logging.getLogger().removeHandler(self)
