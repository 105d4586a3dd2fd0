"""Agent classes the end-to-end tests run inside a real daemon process."""

from __future__ import annotations

import time
from typing import ClassVar

from gatewayd import Agent, Connection, callable


class Recorder(Agent):
    """Stores every message with its transport, syncs a counter, answers each sender."""

    initial_state: ClassVar[dict[str, int]] = {"count": 0}

    def on_start(self) -> None:
        self.sql(
            "CREATE TABLE IF NOT EXISTS messages ("
            " n INTEGER PRIMARY KEY AUTOINCREMENT, transport TEXT NOT NULL, body BLOB NOT NULL)"
        )

    def on_message(self, conn: Connection, message: bytes | str) -> None:
        body = message.encode() if isinstance(message, str) else message
        if body == b"block-the-loop":
            time.sleep(2.5)  # a handler that wedges the event loop (what the watchdog is for)
            return
        if body.startswith(b"slow:"):
            time.sleep(0.002)  # a handler with real work, so a kill lands mid-stream
        self.sql("INSERT INTO messages (transport, body) VALUES (?, ?)", conn.transport, body)
        count = self.state["count"] + 1
        self.set_state({"count": count})
        conn.send(f"ack {count}")

    @callable
    def count(self) -> int:
        return int(self.sql("SELECT count(*) AS c FROM messages")[0]["c"])
