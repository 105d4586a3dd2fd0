"""`MessageStore`: a chat's messages, one row each, in the agent's own SQLite database.

Rows are ordered by a monotonic `seq` (assigned on first insert, kept on update), never by a
timestamp. `persist(incoming)` takes the client's (or the agent's) full list and:

1. reconciles ids: an exact id match first; else an assistant message holding a tool call
   reuses the id of the row that holds that `toolCallId`; else an assistant message without
   tools reuses the id of an unmatched stored assistant message with the same content. So a
   resend with client-side ids never duplicates a row. A tool part the client still shows
   pending takes the stored part when that one has its output;
2. guards (guard.py), serialises, and skips the write when the row equals the last write of
   this id (a cache), else upserts;
3. deletes stored rows missing from `incoming` only when every incoming id was already known
   (a regenerate or trim); one unknown id (another tab's message we have not seen) deletes
   nothing;
4. keeps at most `max_persisted` rows (oldest go first) when set: storage only, not context.

Runs inside the agent's turns through its `sql` callable; the write cache lives with the agent
instance and must be dropped (`forget_cache`) when a turn that wrote rolls back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gatewayd.chat.guard import guard_message
from gatewayd.chat.messages import Message, check_message

Sql = Callable[..., list[dict[str, Any]]]

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS gw_chat_messages ("
    " id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, role TEXT NOT NULL,"
    " message TEXT NOT NULL)"
)

_PENDING_TOOL_STATES = ("input-streaming", "input-available")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _content_key(message: Message) -> str:
    return _dumps([message.get("role"), message.get("parts")])


def _tool_call_ids(message: Message) -> list[str]:
    return [
        p["toolCallId"]
        for p in message.get("parts", ())
        if p.get("type") == "tool" and isinstance(p.get("toolCallId"), str)
    ]


class MessageStore:
    def __init__(self, sql: Sql, *, max_persisted: int | None = None) -> None:
        if max_persisted is not None and max_persisted < 1:
            raise ValueError("max_persisted_messages must be >= 1 (or None: no limit)")
        self._sql = sql
        self.max_persisted = max_persisted
        self._written: dict[str, str] = {}  # id -> JSON of the last write (skip unchanged)

    def create_tables(self) -> None:
        self._sql(SCHEMA)

    def forget_cache(self) -> None:
        self._written.clear()

    # -- reading --------------------------------------------------------------------------

    def load(self) -> list[Message]:
        return [
            json.loads(row["message"])
            for row in self._sql("SELECT message FROM gw_chat_messages ORDER BY seq")
        ]

    def get(self, message_id: str) -> Message | None:
        rows = self._sql("SELECT message FROM gw_chat_messages WHERE id = ?", message_id)
        return json.loads(rows[0]["message"]) if rows else None

    def load_last(self) -> Message | None:
        rows = self._sql("SELECT message FROM gw_chat_messages ORDER BY seq DESC LIMIT 1")
        return json.loads(rows[0]["message"]) if rows else None

    def count(self) -> int:
        return int(self._sql("SELECT COUNT(*) AS n FROM gw_chat_messages")[0]["n"])

    # -- writing --------------------------------------------------------------------------

    def persist(self, incoming: list[Any]) -> list[Message]:
        """Store `incoming` (see the module docstring); returns it with reconciled ids and
        merged tool results, in full (uncompacted: what the model should see)."""
        messages = [check_message(m) for m in incoming]
        stored = self.load()
        by_id = {m["id"]: m for m in stored}
        owner_of_call = {call: m["id"] for m in stored for call in _tool_call_ids(m)}
        claimed = {m["id"] for m in messages if m["id"] in by_id}
        unmatched_by_content: dict[str, list[str]] = {}
        for m in stored:
            if m["role"] == "assistant" and m["id"] not in claimed and not _tool_call_ids(m):
                unmatched_by_content.setdefault(_content_key(m), []).append(m["id"])
        result: list[Message] = []
        all_known = True
        for message in messages:
            message = dict(message)
            if message["id"] not in by_id:
                server_id = self._reconcile_id(message, owner_of_call, unmatched_by_content)
                if server_id is None or server_id in claimed:
                    all_known = False
                else:
                    message["id"] = server_id
                    claimed.add(server_id)
            if message["id"] in by_id:
                message = _merge_tool_results(message, by_id[message["id"]])
            result.append(message)
        for message in result:
            self.save(message)
        if all_known and stored:
            keep = {m["id"] for m in result}
            for m in stored:
                if m["id"] not in keep:
                    self.delete(m["id"])
        self._trim()
        return result

    def _reconcile_id(
        self,
        message: Message,
        owner_of_call: dict[str, str],
        unmatched_by_content: dict[str, list[str]],
    ) -> str | None:
        if message["role"] != "assistant":
            return None
        calls = _tool_call_ids(message)
        if calls:
            return next((owner_of_call[c] for c in calls if c in owner_of_call), None)
        candidates = unmatched_by_content.get(_content_key(message))
        return candidates.pop(0) if candidates else None

    def save(self, message: Message) -> None:
        """Upsert one message (guarded); no write when it equals this id's last write."""
        check_message(message)
        row = _dumps(guard_message(message))
        if self._written.get(message["id"]) == row:
            return
        self._sql(
            "INSERT INTO gw_chat_messages (id, seq, role, message) VALUES (?, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM gw_chat_messages), ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET role = excluded.role, message = excluded.message",
            message["id"],
            message["role"],
            row,
        )
        self._written[message["id"]] = row

    def delete(self, message_id: str) -> None:
        self._sql("DELETE FROM gw_chat_messages WHERE id = ?", message_id)
        self._written.pop(message_id, None)

    def clear(self) -> None:
        self._sql("DELETE FROM gw_chat_messages")
        self._written.clear()

    def _trim(self) -> None:
        if self.max_persisted is None:
            return
        for row in self._sql(
            "SELECT id FROM gw_chat_messages ORDER BY seq DESC LIMIT -1 OFFSET ?",
            self.max_persisted,
        ):
            self.delete(row["id"])


def _merge_tool_results(message: Message, stored: Message) -> Message:
    """A tool part the client still shows pending takes the stored part that has its output."""
    done = {
        p["toolCallId"]: p
        for p in stored.get("parts", ())
        if p.get("type") == "tool" and p.get("state") in ("output-available", "output-error")
    }
    if not done:
        return message
    parts = [
        done[p["toolCallId"]]
        if p.get("type") == "tool"
        and p.get("state") in _PENDING_TOOL_STATES
        and p.get("toolCallId") in done
        else p
        for p in message.get("parts", ())
    ]
    return {**message, "parts": parts}
