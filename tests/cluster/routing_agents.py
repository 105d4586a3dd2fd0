"""The agents the routing tests reach over WebSocket, TCP, MCP and the messages route: their
state and answers name the process that ran the turn, so a test sees which member served it."""

from __future__ import annotations

import os
from typing import Any

from gatewayd.agents import Agent, Connection, callable
from gatewayd.chat import ChatAgent


class Tally(Agent):
    """Counts the messages it applied and the total it was given, and echoes each message."""

    def on_message(self, conn: Connection, message: bytes | str) -> None:
        text = message.decode() if isinstance(message, bytes) else message
        state = self.state if isinstance(self.state, dict) else {}
        self.set_state({**state, "count": state.get("count", 0) + 1, "last": text,
                        "pid": os.getpid()})  # fmt: skip
        conn.send(f"echo:{text}")

    @callable
    def add(self, n: int) -> dict[str, int]:
        state = self.state if isinstance(self.state, dict) else {}
        total = state.get("total", 0) + n
        self.set_state({**state, "total": total, "pid": os.getpid()})
        return {"total": total, "pid": os.getpid()}

    @callable
    def remind(self, after_s: float) -> dict[str, Any]:
        """A schedule far enough ahead that a test sees it pending; where it was made."""
        made = self.schedule(after_s, "add", 1)
        return {"schedule_id": made.id, "pid": os.getpid()}


class Notes(ChatAgent):
    """A chat agent whose conversation a test writes through a call (no model involved)."""

    @callable
    def note(self, text: str) -> int:
        stored = self.persist_messages(
            [*self.messages, {"id": f"m{os.getpid()}-{len(self.messages)}", "role": "user",
                              "parts": [{"type": "text", "text": text}]}]
        )  # fmt: skip
        return len(stored)
