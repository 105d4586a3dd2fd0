"""Chat messages and stream chunks: their shapes, and a message built from its chunks.

A message is `{"id", "role", "parts": [...], "metadata"?}` (JSON). Parts:

    {"type": "text", "text": ...}                 {"type": "reasoning", "text": ...}
    {"type": "tool", "toolCallId", "toolName", "state", "input"?, "output"?, "errorText"?}
    {"type": "file", "url", "mediaType", "filename"?}
    {"type": "data-<name>", "id"?, "data": ...}

Tool part states: "input-streaming", "input-available", "approval-requested",
"approval-responded", "output-available", "output-error", "output-denied" (PROTOCOL.md,
"Tools, client tools and approvals"); a tool part may carry `client: true` and
`approval: {"id", "approved"?, "reason"?}`. A stream chunk is a JSON object with a `type`:

    {"type": "start", "messageId"?, "metadata"?}  {"type": "finish", "metadata"?}
    {"type": "text-delta", "id"?, "delta"}         {"type": "reasoning-delta", "id"?, "delta"}
    {"type": "tool-call", "toolCallId", "toolName", "input", "client"?, "programCallId"?}
    {"type": "tool-approval-request", "toolCallId", "approvalId"}
    {"type": "tool-result", "toolCallId", "output"}  {"type": "tool-error", "toolCallId", "errorText"}
    {"type": "file", "url", "mediaType"}           {"type": "error", "errorText"}
    {"type": "data-<name>", "id"?, "data", "transient"?}

`MessageBuilder` applies chunks in order (to a new message, or to a stored one it continues): deltas with the same `id` extend one part (a delta
without `id` extends the last part of its kind when that part is the last part); a data chunk
replaces the `data` of the part with the same type and id (no deep merge), else it is
appended; a transient data chunk is streamed (and replayed) but never becomes a part.
Pure: no I/O, no runtime.
"""

from __future__ import annotations

import copy
from typing import Any

Message = dict[str, Any]
Chunk = dict[str, Any]

ROLES = ("system", "user", "assistant")


class InvalidMessageError(ValueError):
    """A message or chunk from a client or a model does not have the documented shape."""


def check_message(message: Any) -> Message:
    """`message` if it has the documented shape, else InvalidMessageError saying what is wrong."""
    if not isinstance(message, dict):
        raise InvalidMessageError(f"a message must be a JSON object, got {type(message).__name__}")
    if not isinstance(message.get("id"), str) or not message["id"]:
        raise InvalidMessageError("a message needs a non-empty string 'id'")
    if message.get("role") not in ROLES:
        raise InvalidMessageError(f"message {message['id']!r}: 'role' must be one of {ROLES}")
    parts = message.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in parts
    ):
        raise InvalidMessageError(
            f"message {message['id']!r}: 'parts' must be a list of objects with a string 'type'"
        )
    if "metadata" in message and not isinstance(message["metadata"], dict | None):
        raise InvalidMessageError(f"message {message['id']!r}: 'metadata' must be an object")
    return message


def check_chunk(chunk: Any) -> Chunk:
    if not isinstance(chunk, dict) or not isinstance(chunk.get("type"), str):
        raise InvalidMessageError(f"a stream chunk must be an object with a 'type', got {chunk!r}")
    return chunk


def is_data_type(part_type: str) -> bool:
    return part_type.startswith("data-")


def is_transient(chunk: Chunk) -> bool:
    return is_data_type(chunk["type"]) and bool(chunk.get("transient"))


def text_of(message: Message) -> str:
    """The message's text parts joined (what a plain-text model sees of it)."""
    return "".join(p.get("text", "") for p in message.get("parts", ()) if p.get("type") == "text")


def upsert_data_part(parts: list[dict[str, Any]], part: dict[str, Any]) -> None:
    """Reconcile a data part by (type, id): replace `data` in place, else append."""
    part_id = part.get("id")
    if part_id is not None:
        for existing in parts:
            if existing.get("type") == part["type"] and existing.get("id") == part_id:
                existing["data"] = part.get("data")
                return
    parts.append(part)


class MessageBuilder:
    """Builds the assistant message of one stream from its chunks (see the module docstring)."""

    def __init__(self, message_id: str, continues: Message | None = None) -> None:
        self.message: Message = (
            copy.deepcopy(continues)
            if continues is not None
            else {"id": message_id, "role": "assistant", "parts": []}
        )
        self._open: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, chunk id) -> part

    def apply(self, chunk: Chunk) -> None:
        kind = chunk["type"]
        parts: list[dict[str, Any]] = self.message["parts"]
        if kind == "start":
            if isinstance(chunk.get("messageId"), str) and not parts:
                self.message["id"] = chunk["messageId"]
            self._merge_metadata(chunk)
        elif kind in ("text-delta", "reasoning-delta"):
            self._delta("text" if kind == "text-delta" else "reasoning", chunk)
        elif kind == "tool-call":
            part: dict[str, Any] | None = {
                "type": "tool",
                "toolCallId": chunk.get("toolCallId"),
                "toolName": chunk.get("toolName"),
                "state": "input-available",
                "input": chunk.get("input"),
            }
            assert part is not None
            if chunk.get("client"):
                part["client"] = True
            if isinstance(chunk.get("programCallId"), str):  # a Code Mode program's call
                part["programCallId"] = chunk["programCallId"]
            parts.append(part)
        elif kind == "tool-approval-request":
            part = self._tool_part(chunk.get("toolCallId"))
            if part is not None:
                part.update(state="approval-requested", approval={"id": chunk.get("approvalId")})
        elif kind in ("tool-result", "tool-error"):
            part = self._tool_part(chunk.get("toolCallId"))
            if part is not None:
                part.pop("output", None)
                part.pop("errorText", None)
                if kind == "tool-result":
                    part.update(state="output-available", output=chunk.get("output"))
                    if chunk.get("compacted"):  # stored compacted (guard.compact_chunk)
                        metadata = self.message.setdefault("metadata", {})
                        metadata.setdefault("compactedToolOutputs", []).append(part["toolCallId"])
                else:
                    part.update(state="output-error", errorText=chunk.get("errorText"))
        elif kind == "file":
            parts.append(
                {k: v for k, v in chunk.items() if k in ("type", "url", "mediaType", "filename")}
            )
        elif is_data_type(kind):
            if not chunk.get("transient"):
                part = {"type": kind, "data": copy.deepcopy(chunk.get("data"))}
                if chunk.get("id") is not None:
                    part["id"] = chunk["id"]
                upsert_data_part(parts, part)
        elif kind == "finish":
            self._merge_metadata(chunk)
        # "error" and unknown chunk types are streamed but leave no part.

    def _delta(self, kind: str, chunk: Chunk) -> None:
        parts: list[dict[str, Any]] = self.message["parts"]
        delta = chunk.get("delta", "")
        if not isinstance(delta, str):
            raise InvalidMessageError(f"{chunk['type']} needs a string 'delta'")
        chunk_id = chunk.get("id")
        if chunk_id is not None:
            part = self._open.get((kind, str(chunk_id)))
            if part is None:
                part = self._open[(kind, str(chunk_id))] = {"type": kind, "text": ""}
                parts.append(part)
        elif parts and parts[-1].get("type") == kind:
            part = parts[-1]
        else:
            part = {"type": kind, "text": ""}
            parts.append(part)
        part["text"] += delta

    def _tool_part(self, tool_call_id: Any) -> dict[str, Any] | None:
        for part in reversed(self.message["parts"]):
            if part.get("type") == "tool" and part.get("toolCallId") == tool_call_id:
                return part
        return None

    def _merge_metadata(self, chunk: Chunk) -> None:
        metadata = chunk.get("metadata")
        if isinstance(metadata, dict):
            self.message.setdefault("metadata", {}).update(metadata)
