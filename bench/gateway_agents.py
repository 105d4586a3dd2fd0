"""Agent classes the benchmarks run inside a real gatewayd process (bench/mqtt.py, bench/tcp.py).

Both do what a typical telemetry agent does per message: one SQL insert, one state write
(`set_state`, persisted in the same commit and synced to subscribers), and, for MQTT, one reply.
"""

from __future__ import annotations

from typing import ClassVar

from gatewayd import Agent, Connection


class TelemetryEcho(Agent):
    """Stores each reading, counts it in state and echoes the payload back (QoS 1 reply).

    The payload is echoed unchanged because the load generator embeds its send time in it.
    """

    initial_state: ClassVar[dict[str, object]] = {"readings": 0, "last": None}

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS readings (n INTEGER PRIMARY KEY, body BLOB NOT NULL)")

    def on_message(self, conn: Connection, message: bytes | str) -> None:
        body = message.encode() if isinstance(message, str) else message
        self.sql("INSERT INTO readings (body) VALUES (?)", body)
        self.set_state({"readings": self.state["readings"] + 1, "last": len(body)})
        conn.send(message)


class FrameCounter(Agent):
    """Per TCP DATA frame: one small insert and one state write; no reply (the ACK is the reply)."""

    initial_state: ClassVar[dict[str, object]] = {"frames": 0, "last_bytes": 0}

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS frames (n INTEGER PRIMARY KEY, size INTEGER NOT NULL)")

    def on_message(self, conn: Connection, message: bytes | str) -> None:
        self.sql("INSERT INTO frames (size) VALUES (?)", len(message))
        self.set_state({"frames": self.state["frames"] + 1, "last_bytes": len(message)})


class ReliabilityRecorder(Agent):
    """bench/reliability.py: stores every message with its transport and echoes it back.

    No UNIQUE constraint on purpose: the benchmark counts a TCP frame stored twice as a frame
    applied twice. Each sender gets the body back (MQTT reply, TCP PUSH, WebSocket frame), so
    the benchmark can count replies against committed messages.
    """

    initial_state: ClassVar[dict[str, object]] = {"messages": 0}

    def on_start(self) -> None:
        self.sql(
            "CREATE TABLE IF NOT EXISTS messages ("
            " n INTEGER PRIMARY KEY AUTOINCREMENT, transport TEXT NOT NULL, body BLOB NOT NULL)"
        )

    def on_message(self, conn: Connection, message: bytes | str) -> None:
        body = message.encode() if isinstance(message, str) else message
        self.sql("INSERT INTO messages (transport, body) VALUES (?, ?)", conn.transport, body)
        self.set_state({"messages": self.state["messages"] + 1})
        conn.send(body)
