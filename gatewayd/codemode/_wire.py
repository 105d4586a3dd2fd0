"""The pipe protocol between the host and a sandbox worker: length-prefixed JSON messages.

Each message is a 4-byte big-endian length then that many bytes of UTF-8 JSON (an object with a
`type`). Shared by the host (`pool.py`) and the worker (`_worker.py`); stdlib only, because the
worker imports it before anything else.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

HEADER = struct.Struct(">I")


class WireError(Exception):
    """The other side sent something that is not a message of this protocol."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    return HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader, max_bytes: int) -> dict[str, Any] | None:
    """The next message, or None at end of stream. Raises WireError past `max_bytes`."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WireError("the stream ended inside a message header") from exc
        return None
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise WireError(f"a message of {length} bytes is over the {max_bytes}-byte limit")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise WireError("the stream ended inside a message") from exc
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise WireError(f"a message is not JSON: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireError("a message is not an object with a string 'type'")
    return message
