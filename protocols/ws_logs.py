"""What the websockets library may write to gatewayd's logs: never a secret, at any level.

At DEBUG the library logs every handshake header (`Sec-WebSocket-Key`, `Authorization`,
`Cookie`, ...), the request path (tokens often ride in its query string) and a preview of every
frame's payload (an app's auth message). `library_logger()` is the logger the WebSocket listener
hands to the library; a filter on it rewrites those records before any handler sees them:
header values outside a short list of harmless headers, query values and frame payloads are
replaced by `[redacted]` / a byte count. Must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

LIBRARY_LOGGER_NAME = "protocols.ws.library"
REDACTED = "[redacted]"

# Header values worth seeing while debugging a handshake and never carrying a credential.
# Everything else (Authorization, Cookie, Sec-WebSocket-Key/Accept, Sec-WebSocket-Protocol,
# which browsers use to smuggle tokens, custom X-Api-Key headers, ...) is redacted.
_SHOWN_HEADERS = frozenset(
    {
        "host",
        "origin",
        "user-agent",
        "upgrade",
        "connection",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "content-type",
        "content-length",
        "date",
        "server",
    }
)


def redact_path(path: str) -> str:
    """`/agents/a/b?token=abc&x=1` -> `/agents/a/b?token=[redacted]&x=[redacted]`."""
    parts = urlsplit(path)
    if not parts.query:
        return path
    names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
    query = "&".join(f"{name}={REDACTED}" for name in names) or REDACTED
    return f"{parts.path}?{query}"


def _redact_header(name: object, value: object) -> tuple[object, object]:
    if str(name).lower() in _SHOWN_HEADERS:
        return name, value
    return name, REDACTED


def _frame_summary(frame: Any) -> str:
    """A frame's kind and size, without its payload."""
    opcode = getattr(getattr(frame, "opcode", None), "name", "FRAME")
    data = getattr(frame, "data", b"")
    fin = "" if getattr(frame, "fin", True) else " [continued]"
    return f"{opcode} [{len(data)} bytes]{fin}"


def _redact(record: logging.LogRecord) -> bool:
    args = record.args
    if not isinstance(args, tuple) or not isinstance(record.msg, str):
        return True
    msg = record.msg
    if msg in ("< %s: %s", "> %s: %s") and len(args) == 2:  # one handshake header
        record.args = _redact_header(*args)
    elif msg == "< %s %s %s" and len(args) == 3:  # the request line
        record.args = (args[0], redact_path(str(args[1])), args[2])
    elif msg in ("< %s", "> %s") and len(args) == 1 and not isinstance(args[0], str):
        record.args = (_frame_summary(args[0]),)  # a frame: its payload is the app's data
    return True


def library_logger() -> logging.Logger:
    """The logger to give the websockets library: secrets are redacted from every record."""
    logger = logging.getLogger(LIBRARY_LOGGER_NAME)
    if _redact not in logger.filters:
        logger.addFilter(_redact)
    return logger
