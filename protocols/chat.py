"""The `gw.chat.*` frames of the JSON protocol: chat agents over WebSocket (pure, no I/O).

Client frames reach the agent as `jsonproto.ExtensionFrame`s (the gateway passes the whole
`gw.chat.` family to the agent class, `Agent.on_protocol_frame`); this module names the
types and encodes the gateway's frames. Specification with examples: PROTOCOL.md, "Chat".
"""

from __future__ import annotations

import json
from typing import Any

# client -> gateway
SEND = "gw.chat.send"
RESUME = "gw.chat.resume"
CANCEL = "gw.chat.cancel"
CLEAR = "gw.chat.clear"
SYNC = "gw.chat.sync"
GET_MESSAGES = "gw.chat.get_messages"
TOOL_RESULT = "gw.chat.tool_result"
TOOL_APPROVAL = "gw.chat.tool_approval"
# gateway -> client
CHUNK = "gw.chat.chunk"
DONE = "gw.chat.done"
RESUMING = "gw.chat.resuming"
REPLAY_COMPLETE = "gw.chat.replay_complete"
RESUME_NONE = "gw.chat.resume_none"
MESSAGES = "gw.chat.messages"
CLEARED = "gw.chat.cleared"
MESSAGE_UPDATED = "gw.chat.message_updated"
ERROR = "gw.chat.error"

# How a stream ended (`gw.chat.done` `status`).
COMPLETE = "complete"
CANCELLED = "cancelled"
FAILED = "error"
INTERRUPTED = "interrupted"  # the gateway stopped or crashed mid-stream; the partial answer is kept


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_chunk(
    stream_id: str, request_id: str, seq: int, chunk_json: str, *, replay: bool = False
) -> str:
    """`chunk_json` is the chunk already serialised (as stored), spliced in without re-encoding."""
    head = _dumps(
        {"type": CHUNK, "stream": stream_id, "request": request_id, "seq": seq, "replay": replay}
    )
    return head[:-1] + ',"chunk":' + chunk_json + "}"


def encode_done(
    stream_id: str,
    request_id: str,
    status: str,
    error: str | None = None,
    *,
    replay: bool = False,
    waiting: list[dict[str, Any]] | None = None,
) -> str:
    """`waiting`: the tool calls the answer paused on (omitted when none)."""
    frame: dict[str, Any] = {
        "type": DONE,
        "stream": stream_id,
        "request": request_id,
        "status": status,
        "replay": replay,
    }
    if error is not None:
        frame["error"] = error
    if waiting:
        frame["waiting"] = waiting
    return _dumps(frame)


def encode_resuming(stream_id: str, request_id: str) -> str:
    return _dumps({"type": RESUMING, "stream": stream_id, "request": request_id})


def encode_replay_complete(stream_id: str, request_id: str) -> str:
    return _dumps({"type": REPLAY_COMPLETE, "stream": stream_id, "request": request_id})


def encode_resume_none() -> str:
    return _dumps({"type": RESUME_NONE})


def encode_messages(messages: list[dict[str, Any]]) -> str:
    return _dumps({"type": MESSAGES, "messages": messages})


def encode_message_updated(message: dict[str, Any]) -> str:
    return _dumps({"type": MESSAGE_UPDATED, "message": message})


def encode_cleared() -> str:
    return _dumps({"type": CLEARED})


def encode_error(message: str, request_id: str | None = None) -> str:
    frame: dict[str, Any] = {"type": ERROR, "error": message}
    if request_id is not None:
        frame["request"] = request_id
    return _dumps(frame)
