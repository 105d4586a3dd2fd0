"""Answers to waiting tool calls: approvals, denials and client tool results.

A tool call waits in the stored assistant message (state "approval-requested", or a client
call in "input-available") until a client answers (`gw.chat.tool_approval`,
`gw.chat.tool_result`). An answer is first stored (`AnswerStore`, table
`gw_chat_tool_answers`, in the same turn that received it), then applied to the message when
no stream is writing it (`apply_answer`), then deleted: so an answer that arrives mid-stream,
before a crash or while the agent hibernates is never lost. Pure helpers plus one SQL table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatewayd.chat.messages import InvalidMessageError, Message

Sql = Callable[..., list[dict[str, Any]]]

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS gw_chat_tool_answers ("
    " tool_call_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, answer TEXT NOT NULL)"
)

APPROVAL = "approval"
CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Answer:
    """`kind` "approval" (`approved`, `reason`) or "client" (`output` or `error_text`)."""

    tool_call_id: str
    request_id: str
    kind: str
    approved: bool = False
    reason: str | None = None
    output: Any = None
    error_text: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "approved": self.approved,
                "reason": self.reason,
                "output": self.output,
                "errorText": self.error_text,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_row(cls, tool_call_id: str, request_id: str, raw: str) -> Answer:
        data = json.loads(raw)
        return cls(
            tool_call_id,
            request_id,
            data["kind"],
            bool(data.get("approved")),
            data.get("reason"),
            data.get("output"),
            data.get("errorText"),
        )


def parse_answer(frame_type_kind: str, frame: dict[str, Any], request_id: str) -> Answer:
    """The answer a `gw.chat.tool_approval` ("approval") or `gw.chat.tool_result` ("client")
    frame carries, or InvalidMessageError naming the bad field."""
    call_id = frame.get("toolCallId")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidMessageError("a tool answer needs a non-empty string 'toolCallId'")
    if frame_type_kind == APPROVAL:
        approved = frame.get("approved")
        if not isinstance(approved, bool):
            raise InvalidMessageError(f"tool call {call_id!r}: 'approved' must be true or false")
        reason = frame.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise InvalidMessageError(f"tool call {call_id!r}: 'reason' must be a string")
        return Answer(call_id, request_id, APPROVAL, approved=approved, reason=reason)
    error_text = frame.get("errorText")
    if error_text is not None and not isinstance(error_text, str):
        raise InvalidMessageError(f"tool call {call_id!r}: 'errorText' must be a string")
    if "output" not in frame and error_text is None:
        raise InvalidMessageError(f"tool call {call_id!r}: give 'output' or 'errorText'")
    return Answer(call_id, request_id, CLIENT, output=frame.get("output"), error_text=error_text)


def waiting_calls(message: Message | None) -> list[dict[str, Any]]:
    """The tool calls of `message` waiting for a person or a client, as `gw.chat.done`
    lists them: `{"toolCallId", "toolName", "kind"}`."""
    if message is None or message.get("role") != "assistant":
        return []
    waiting = []
    for part in message.get("parts", ()):
        if part.get("type") != "tool":
            continue
        kind = _waiting_kind(part)
        if kind is not None:
            waiting.append(
                {
                    "toolCallId": part.get("toolCallId"),
                    "toolName": part.get("toolName"),
                    "kind": kind,
                }
            )
    return waiting


def _waiting_kind(part: dict[str, Any]) -> str | None:
    if part.get("state") == "approval-requested":
        return APPROVAL
    if part.get("state") == "input-available" and part.get("client"):
        return CLIENT
    return None


def find_tool_part(message: Message, tool_call_id: str) -> dict[str, Any] | None:
    for part in message.get("parts", ()):
        if part.get("type") == "tool" and part.get("toolCallId") == tool_call_id:
            return part
    return None


def apply_answer(message: Message, answer: Answer) -> str | None:
    """Apply `answer` to its tool part in `message` (in place); None when applied, else why
    not (the call is unknown, or not waiting for this kind of answer)."""
    part = find_tool_part(message, answer.tool_call_id)
    if part is None:
        return f"no tool call {answer.tool_call_id!r} in the last assistant message"
    kind = _waiting_kind(part)
    if kind != answer.kind:
        wanted = "an approval" if answer.kind == APPROVAL else "a client result"
        return (
            f"tool call {answer.tool_call_id!r} ({part.get('toolName')}) is not waiting for "
            f"{wanted} (state {part.get('state')!r})"
        )
    if answer.kind == APPROVAL:
        approval = dict(part.get("approval") or {})
        approval["approved"] = answer.approved
        if answer.reason is not None:
            approval["reason"] = answer.reason
        part["approval"] = approval
        part["state"] = "approval-responded" if answer.approved else "output-denied"
    elif answer.error_text is not None:
        part.update(state="output-error", errorText=answer.error_text)
    else:
        part.update(state="output-available", output=answer.output)
    return None


class AnswerStore:
    def __init__(self, sql: Sql) -> None:
        self._sql = sql

    def create_tables(self) -> None:
        self._sql(SCHEMA)

    def add(self, answer: Answer) -> bool:
        """Store `answer`; False when that call already has a stored answer."""
        rows = self._sql(
            "INSERT INTO gw_chat_tool_answers (tool_call_id, request_id, answer) VALUES (?, ?, ?)"
            " ON CONFLICT(tool_call_id) DO NOTHING RETURNING tool_call_id",
            answer.tool_call_id,
            answer.request_id,
            answer.to_json(),
        )
        return bool(rows)

    def all(self) -> list[Answer]:
        return [
            Answer.from_row(row["tool_call_id"], row["request_id"], row["answer"])
            for row in self._sql(
                "SELECT tool_call_id, request_id, answer FROM gw_chat_tool_answers ORDER BY rowid"
            )
        ]

    def delete(self, tool_call_id: str) -> None:
        self._sql("DELETE FROM gw_chat_tool_answers WHERE tool_call_id = ?", tool_call_id)

    def clear(self) -> None:
        self._sql("DELETE FROM gw_chat_tool_answers")
