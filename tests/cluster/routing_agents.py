"""The agent the routing tests reach over WebSocket and MCP: its state and answers name the
process that ran the turn, so a test sees which member served it."""

from __future__ import annotations

import os

from gatewayd.agents import Agent, Connection, callable


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
