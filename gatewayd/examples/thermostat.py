"""Example agent: a thermostat shared by a temperature device and a web dashboard.

Devices send readings as JSON `{"temp": 21.5}` (text, or bytes such as an MQTT payload from
`mosquitto_pub`) or as a binary CBOR map `{"temp": 21.5}` (e.g. TCP frames); every reading is
stored in SQL, the agent's state (last temperature, target, heating on/off, anomaly score) is
synced to JSON dashboards, and a device that sent bytes gets `{"heating": true}` back in the
same encoding (JSON bytes or CBOR) to drive its relay.
A check scheduled every minute marks the thermostat stale when no reading arrived for
`STALE_AFTER_S`. With an inference engine that serves a model named "anomaly" (float32
window of 32 readings in, output "score"), every reading once 32 are stored is scored;
without one the score stays None.

    gatewayd config:   [agents.classes] thermostat = "gatewayd.examples.thermostat:Thermostat"
    dashboard:         ws://HOST:PORT/agents/thermostat/living-room
    WebSocket device:  ws://HOST:PORT/agents/thermostat/living-room?device=1 (no JSON frames)
    RPC:               {"type":"gw.rpc","id":1,"method":"set_target","args":[22]}
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import cbor2
import numpy as np

from gatewayd.agents import Agent, Connection, RpcStream, callable

logger = logging.getLogger(__name__)

WINDOW = 32
STALE_AFTER_S = 300.0
CHECK_EVERY_S = 60.0
HYSTERESIS_C = 0.5


class BadReading(ValueError):
    """A device message that is not a temperature reading."""


def is_json_bytes(message: bytes | str) -> bool:
    """Bytes that hold a JSON object (`mosquitto_pub -m '{"temp": 21.5}'`) rather than CBOR.

    A CBOR map starts with a byte in 0xA0-0xBF; `{` (0x7B) never starts a map, so the two
    encodings cannot be confused."""
    return isinstance(message, bytes) and message.lstrip()[:1] == b"{"


def parse_reading(message: bytes | str) -> float:
    """`{"temp": <number>}` as JSON (text or bytes) or a CBOR map; raises BadReading otherwise."""
    as_json = isinstance(message, str) or is_json_bytes(message)
    try:
        if as_json:
            data = json.loads(message)
        else:
            assert isinstance(message, bytes)
            data = cbor2.loads(message)
    except (ValueError, cbor2.CBORDecodeError) as err:
        kind = "JSON" if as_json else "CBOR"
        raise BadReading(f'reading is not valid {kind}: {err}; send {{"temp": 21.5}}') from None
    temp = data.get("temp") if isinstance(data, dict) else None
    if isinstance(temp, bool) or not isinstance(temp, int | float) or not -60 <= temp <= 150:
        raise BadReading(f"reading needs a numeric 'temp' in -60..150 °C, got {data!r}")
    return float(temp)


class Thermostat(Agent):
    initial_state: ClassVar[dict[str, Any]] = {
        "temp": None,
        "target": 21.0,
        "heating": False,
        "anomaly": None,
        "stale": True,
        "readings": 0,
    }

    def on_start(self) -> None:
        self.sql(
            "CREATE TABLE IF NOT EXISTS readings ("
            "id INTEGER PRIMARY KEY, at REAL NOT NULL, temp REAL NOT NULL)"
        )
        self.schedule_every(CHECK_EVERY_S, "check_stale")  # idempotent across wakes

    async def on_message(self, conn: Connection, message: bytes | str) -> None:
        temp = parse_reading(message)
        now = time.time()
        self.sql("INSERT INTO readings (at, temp) VALUES (?, ?)", now, temp)
        target = self.state["target"]
        heating = self.state["heating"]
        if temp < target - HYSTERESIS_C:
            heating = True
        elif temp > target + HYSTERESIS_C:
            heating = False
        anomaly = await self._anomaly_score()
        self.set_state(
            {
                **self.state,
                "temp": temp,
                "heating": heating,
                "anomaly": anomaly,
                "stale": False,
                "last_at": now,
                "readings": self.state["readings"] + 1,
            }
        )
        if isinstance(message, bytes):  # a device: answer in the encoding it spoke
            reply = {"heating": heating}
            conn.send(json.dumps(reply).encode() if is_json_bytes(message) else cbor2.dumps(reply))

    async def _anomaly_score(self) -> float | None:
        if not self.has_model("anomaly"):
            return None
        rows = self.sql("SELECT temp FROM readings ORDER BY id DESC LIMIT ?", WINDOW)
        if len(rows) < WINDOW:
            return None
        window = np.array([r["temp"] for r in reversed(rows)], dtype=np.float32).reshape(1, WINDOW)
        outputs = await self.infer("anomaly", window)
        return float(np.asarray(outputs["score"]).reshape(-1)[0])

    def check_stale(self, payload: Any) -> None:
        last_at = self.state.get("last_at")
        stale = last_at is None or time.time() - last_at > STALE_AFTER_S
        if stale != self.state["stale"]:
            self.set_state({**self.state, "stale": stale})

    def should_send_protocol_messages(self, conn: Connection, ctx: dict[str, Any]) -> bool:
        # A device connecting over WebSocket says so in its URL (`?device=1`): it gets only
        # its CBOR replies, never JSON protocol frames. MQTT/TCP devices are off by default.
        query = parse_qs(urlsplit(str(ctx.get("path", ""))).query)
        if query.get("device") == ["1"]:
            return False
        return super().should_send_protocol_messages(conn, ctx)

    def validate_state_change(self, new_state: Any, source: Connection | str) -> None:
        target = new_state.get("target") if isinstance(new_state, dict) else None
        if isinstance(target, bool) or not isinstance(target, int | float) or not 5 <= target <= 30:
            raise ValueError("target must be a number within 5..30 °C")

    @callable(description="Set the target temperature (°C).")
    def set_target(self, target: float) -> float:
        self.set_state({**self.state, "target": float(target)})
        return float(target)

    @callable(streaming=True, description="Stream the last `n` readings, oldest first.")
    def history(self, stream: RpcStream, n: int = 10) -> int:
        rows = self.sql("SELECT at, temp FROM readings ORDER BY id DESC LIMIT ?", int(n))
        for row in reversed(rows):
            stream.send(row)
        return len(rows)
