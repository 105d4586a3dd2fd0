"""Structured logging: one event per line as `key=value` pairs (logfmt), journald-friendly.

Under systemd (`$JOURNAL_STREAM` set) lines carry no timestamp of their own (the journal adds
one) and start with a `<N>` syslog priority prefix so `journalctl -p err` works.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _quote(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "._-:/@+" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """`level=info logger=gatewayd.daemon msg="ready" key=value ...` on one line."""

    def __init__(self, *, for_journal: bool) -> None:
        super().__init__()
        self.for_journal = for_journal

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if not self.for_journal:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            parts.append(f"ts={stamp}.{int(record.msecs):03d}Z")
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={record.name}")
        parts.append(f"msg={_quote(record.getMessage())}")
        for key, value in getattr(record, "fields", {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        if self.for_journal:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup_logging(level: str) -> None:
    """Route every logger to stderr in logfmt at `level` ("debug", "info", ...)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(for_journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    # websockets logs every handshake failure at INFO with a traceback; keep it quieter.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))
