"""Row size guard: every message fits in one SQLite row, whatever it holds.

A message whose JSON is over `MAX_MESSAGE_BYTES` (UTF-8 bytes, not characters) is compacted
for storage, in passes, each stopping as soon as the message fits:

1. tool outputs over `COMPACT_OVER_CHARS` (largest first) become a note plus a preview
   (`metadata.compactedToolOutputs`: their tool call ids);
2. then text parts the same way (`metadata.compactedTextParts`: part indices);
3. then reasoning, file (inline `data:` URLs) and data parts (`metadata.compactedParts`);
4. last resort (thousands of small parts, huge metadata): the trailing parts are replaced by
   one note (`metadata.droppedParts`: how many), and metadata over the budget is replaced too.

Unlike the anchor, no message can make a write fail. Only the stored copy is compacted: the
live stream and the model get the full content. Pure: no I/O.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from typing import Any

from gatewayd.chat.messages import Message, is_data_type

MAX_MESSAGE_BYTES = 1_800_000  # under the runtime's 2 MB value limit, with room for the row
COMPACT_OVER_CHARS = 1_000
PREVIEW_CHARS = 500
_METADATA_BUDGET_BYTES = 100_000


def encoded_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _note(what: str, size: int, preview: str) -> str:
    return (
        f"[{what} too large to store ({size} bytes); compacted. Preview of the first "
        f"{PREVIEW_CHARS} characters follows; re-run the step for the full content.]\n"
        + preview[:PREVIEW_CHARS]
    )


def guard_message(message: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """`message` itself if it fits, else a compacted copy that fits (see the module doc)."""
    if encoded_size(message) <= max_bytes:
        return message
    out = copy.deepcopy(message)
    parts: list[dict[str, Any]] = out.get("parts") or []
    metadata: dict[str, Any] = out.get("metadata") or {}
    out["metadata"] = metadata
    # The size is tracked part by part (one JSON encoding per changed part, not one of the
    # whole message per step); metadata lists grow a little: `slack` bytes are kept for them.
    sizes = [encoded_size(part) for part in parts]
    slack = 200 + 40 * len(parts)
    total = encoded_size(out) + slack

    def compact(i: int, change: Callable[[dict[str, Any]], None]) -> None:
        nonlocal total
        change(parts[i])
        new_size = encoded_size(parts[i])
        total += new_size - sizes[i]
        sizes[i] = new_size

    def largest(kinds: Callable[[dict[str, Any]], bool]) -> list[int]:
        found = [i for i, part in enumerate(parts) if kinds(part) and sizes[i] > COMPACT_OVER_CHARS]
        return sorted(found, key=lambda i: -sizes[i])

    # 1. tool outputs
    for i in largest(lambda p: p.get("type") == "tool" and "output" in p):
        if total <= max_bytes:
            break
        output = parts[i]["output"]
        raw = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        if len(raw) <= COMPACT_OVER_CHARS:
            continue
        note = _note("tool output", len(raw.encode("utf-8")), raw)
        compact(i, functools.partial(_set, "output", note))
        metadata.setdefault("compactedToolOutputs", []).append(parts[i].get("toolCallId"))
    # 2. text parts
    for i in largest(lambda p: p.get("type") == "text"):
        if total <= max_bytes:
            break
        text = str(parts[i].get("text", ""))
        if len(text) <= COMPACT_OVER_CHARS:
            continue
        compact(i, functools.partial(_set, "text", _note("text", len(text.encode("utf-8")), text)))
        metadata.setdefault("compactedTextParts", []).append(i)
    # 3. reasoning, file and data parts
    for i in largest(lambda p: p.get("type") in ("reasoning", "file") or is_data_type(p["type"])):
        if total <= max_bytes:
            break
        compact(i, _compact_other)
        metadata.setdefault("compactedParts", []).append(i)
    if encoded_size(out) <= max_bytes:
        return out
    # 4. last resort: metadata, then trailing parts
    for key in [k for k in metadata if encoded_size(metadata[k]) > _METADATA_BUDGET_BYTES]:
        metadata[key] = _note(f"metadata {key!r}", encoded_size(metadata[key]), "")
    # Drop trailing parts by their measured size (one JSON encoding each, not one per try),
    # keeping room for the note that says so.
    excess = encoded_size(out) - max_bytes + 200
    dropped = 0
    while parts and excess > 0:
        excess -= encoded_size(parts.pop()) + 1
        dropped += 1
    if dropped:
        parts.append({"type": "text", "text": f"[{dropped} parts too large to store were dropped]"})
        metadata["droppedParts"] = dropped
    return out


def _set(key: str, value: Any, part: dict[str, Any]) -> None:
    part[key] = value


def _compact_other(part: dict[str, Any]) -> None:
    if part["type"] == "reasoning":
        text = str(part.get("text", ""))
        part["text"] = _note("reasoning", len(text.encode("utf-8")), text)
    elif part["type"] == "file":
        url = str(part.get("url", ""))
        part["url"] = None
        part["compacted"] = _note("inline file", len(url.encode("utf-8")), "")
    else:
        raw = json.dumps(part.get("data"), ensure_ascii=False)
        part["data"] = {"compacted": _note("data", len(raw.encode("utf-8")), raw)}


def compact_chunk(chunk_json: str, max_bytes: int) -> str:
    """A stream chunk (serialised) that fits `max_bytes` for storage: a big tool output, text
    delta or data payload becomes a note plus a preview (the live stream had it in full)."""
    size = len(chunk_json.encode("utf-8"))
    if size <= max_bytes:
        return chunk_json
    chunk = json.loads(chunk_json)
    kind = chunk.get("type")
    if kind == "tool-result":
        output = chunk.get("output")
        raw = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        chunk["output"] = _note("tool output", size, raw)
        chunk["compacted"] = True
    elif kind in ("text-delta", "reasoning-delta"):
        chunk["delta"] = _note("text", size, str(chunk.get("delta", "")))
        chunk["compacted"] = True
    elif is_data_type(str(kind)):
        raw = json.dumps(chunk.get("data"), ensure_ascii=False)
        chunk["data"] = {"compacted": _note("data", size, raw)}
    else:
        chunk = {"type": "gw-omitted", "of": str(kind)[:64], "bytes": size}
    compacted = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
    if len(compacted.encode("utf-8")) > max_bytes:  # a huge id or metadata: drop it all
        compacted = json.dumps({"type": "gw-omitted", "of": str(kind)[:64], "bytes": size})
    return compacted
