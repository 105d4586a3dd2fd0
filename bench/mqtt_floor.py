"""The durable MQTT floor: the least a Python responder does for what the gateway promises.

A bare responder on the gateway's own MQTT client (protocols/mqttwire, one connection, MQTT 5)
that keeps the gateway's durability rules and nothing else: each device has its own SQLite
file (WAL, synchronous=NORMAL); the messages a device's file gets in one loop iteration share
one transaction (the reading, the device's state as JSON, the reply as an outbox row), and
only after its COMMIT is each message PUBACKed and its reply published (QoS 1); a reply's row
is deleted in that device's next transaction once the broker acknowledged it. No agents, no
runtime, no routing, no metrics, no error handling beyond what the bench needs.

`bench/mqtt.py --real-clients --floor` runs it beside the echo and the gateway with the same
real `mosquitto_pub` clients, so its CPU per message is the floor the gateway's figure is read
against (per-device files: every message of a paced device is its own COMMIT).

    python bench/mqtt_floor.py --broker mqtt://127.0.0.1:1883 --state-dir /tmp/floor
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocols.mqtt_settings import parse_broker_url  # noqa: E402
from protocols.mqttwire.aio import MqttClient  # noqa: E402
from protocols.mqttwire.codec import V5, Publish  # noqa: E402
from protocols.mqttwire.connection import ConnectOptions  # noqa: E402

REQUEST_TOPIC = "devices/+/telemetry"
REPLY_TOPIC = "devices/{id}/cmd"


class DeviceFile:
    """One device's SQLite file and the outbox rows its broker already acknowledged."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS readings (n INTEGER PRIMARY KEY, body BLOB NOT NULL)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY, json TEXT)")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, topic TEXT, body BLOB)"
        )
        row = self.db.execute("SELECT json FROM state WHERE id = 1").fetchone()
        self.state: dict[str, Any] = json.loads(row[0]) if row else {"readings": 0, "last": None}
        self.delivered: list[int] = []


class FloorResponder:
    def __init__(self, client: MqttClient, state_dir: Path) -> None:
        self.client = client
        self.state_dir = state_dir
        self.files: dict[str, DeviceFile] = {}

    def file(self, device_id: str) -> DeviceFile:
        device = self.files.get(device_id)
        if device is None:
            device = self.files[device_id] = DeviceFile(self.state_dir / f"{device_id}.sqlite3")
        return device

    async def run(self) -> None:
        client = self.client
        while True:
            batch = [await client.receive()]
            while client.incoming.qsize():  # what this iteration read, without yielding
                batch.append(await client.receive())
            self.apply(batch)

    def apply(self, batch: list[Publish]) -> None:
        by_device: dict[str, list[Publish]] = {}
        for message in batch:
            by_device.setdefault(message.topic.split("/")[1], []).append(message)
        for device_id, messages in by_device.items():
            device = self.file(device_id)
            db = device.db
            db.execute("BEGIN")
            if device.delivered:
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in device.delivered])
                device.delivered.clear()
            reply_topic = REPLY_TOPIC.format(id=device_id)
            replies = []
            for message in messages:
                db.execute("INSERT INTO readings (body) VALUES (?)", (message.payload,))
                device.state = {
                    "readings": device.state["readings"] + 1,
                    "last": len(message.payload),
                }
                seq = db.execute(
                    "INSERT INTO outbox (topic, body) VALUES (?, ?)",
                    (reply_topic, message.payload),
                ).lastrowid
                replies.append((seq, message.payload))
            db.execute("INSERT OR REPLACE INTO state VALUES (1, ?)", (json.dumps(device.state),))
            db.execute("COMMIT")
            for message in messages:
                self.client.ack(message.packet_id, message.qos)
            for seq, payload in replies:
                _, acked = self.client.publish_nowait(reply_topic, payload, qos=1)
                acked.add_done_callback(
                    lambda _f, device=device, seq=seq: device.delivered.append(seq)
                )


async def serve(broker_url: str, state_dir: Path) -> None:
    address = parse_broker_url(broker_url)
    options = ConnectOptions(
        f"floor-bench-{os.getpid()}",
        version=V5,
        properties={"receive_maximum": 1000},
        max_inflight=1000,
    )
    client = MqttClient(address.host, address.port, options)
    await client.connect()
    await client.subscribe(REQUEST_TOPIC, qos=1)
    responder = FloorResponder(client, state_dir)
    task = asyncio.create_task(responder.run())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    task.cancel()
    await client.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--state-dir", help="default: a temporary directory")
    args = parser.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    if args.state_dir:
        run(serve(args.broker, Path(args.state_dir)))
        return
    with tempfile.TemporaryDirectory(prefix="mqtt-floor-") as state_dir:
        run(serve(args.broker, Path(state_dir)))


if __name__ == "__main__":
    main()
