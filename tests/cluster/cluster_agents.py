"""The agent the cluster tests run: records every message it applied, in its own table."""

from __future__ import annotations

from gatewayd.agents import Agent, Connection


class Recorder(Agent):
    """Appends each message to `seen` (no unique key: a message applied twice shows twice) and
    echoes it to the device (published once the turn committed)."""

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS seen (message TEXT NOT NULL)")

    def on_message(self, conn: Connection, message: bytes | str) -> None:
        text = message.decode() if isinstance(message, bytes) else message
        self.sql("INSERT INTO seen (message) VALUES (?)", text)
        if text.startswith("schedule:"):  # "schedule:<seconds>:<name>"
            _, delay, name = text.split(":", 2)
            self.schedule(float(delay), "fired", name)
        count = self.state.get("count", 0) if isinstance(self.state, dict) else 0
        self.set_state({"count": count + 1, "last": text})
        conn.send(message)

    def fired(self, name: str) -> None:
        self.sql("INSERT INTO seen (message) VALUES (?)", f"fired:{name}")
