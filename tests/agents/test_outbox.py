"""Durable outputs end to end: real agent runtime (real SQLite), real MQTT bridge, real
Mosquitto. Replies are never dropped under a flood, and a reply committed but not yet
delivered when the gateway is SIGKILLed is delivered after the restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import aiomqtt

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.agents.outbox import OutboxIndex
from gatewayd.agents.storage import agent_db_file
from protocols.mqtt import MqttBridge
from tests.agents.outbox_gateway import Echo, settings
from tests.brokers import MosquittoBroker

REPO_ROOT = Path(__file__).resolve().parents[2]


async def _publish(broker: MosquittoBroker, client_id: str, items: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=client_id, max_inflight_messages=100
    ) as client:
        client.pending_calls_threshold = 1000
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in chunk))


def _outbox_rows(state_dir: Path, agent_id: str) -> int:
    path = agent_db_file(str(state_dir), "echo", agent_id)
    with sqlite3.connect(path) as db:
        count = db.execute("SELECT COUNT(*) FROM _gw_outbox").fetchone()[0]
    db.close()
    return int(count)


async def test_flood_into_a_durable_agent_gets_every_reply(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # The scene, scaled to seconds: parallel publishers, QoS 1, an echo agent, and an
    # outbound backlog far smaller than the flood (it used to drop what did not fit).
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path / "state"), {"echo": Echo})
    await runtime.start()
    bridge = MqttBridge(
        settings(mosquitto.url, max_outbound_queue=8, max_inflight_publishes=2), runtime
    )
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    publishers, per_publisher = 5, 300
    expected = {
        f"devices/d{p}/cmd": {b"echo:%d" % n for n in range(per_publisher)}
        for p in range(publishers)
    }
    received: dict[str, set[bytes]] = {topic: set() for topic in expected}
    total = publishers * per_publisher
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
            await device.subscribe("devices/+/cmd", qos=1)
            flood = asyncio.gather(
                *(
                    _publish(
                        mosquitto,
                        f"pub-{p}",
                        [(f"devices/d{p}/telemetry", b"%d" % n) for n in range(per_publisher)],
                    )
                    for p in range(publishers)
                )
            )
            count = 0
            async with asyncio.timeout(90):
                async for message in device.messages:
                    received[message.topic.value].add(bytes(message.payload))
                    count = sum(len(v) for v in received.values())
                    if count == total:
                        break
            await flood
        assert received == expected
        assert bridge.stats.extra["outbound_backpressure_pauses"] > 0
        # Every reply was delivered (PUBACK), so nothing is owed and, once the agents
        # hibernate, their outbox rows are gone.
        assert all(runtime._outbox.undelivered(("echo", f"d{p}")) == 0 for p in range(publishers))
        assert runtime.hibernate_idle() == publishers
    finally:
        await bridge.stop(drain_timeout_s=5)
        await runtime.drain(5)
        await runtime.close()
    assert [_outbox_rows(tmp_path / "state", f"d{p}") for p in range(publishers)] == [0] * 5
    index = OutboxIndex(tmp_path / "state" / "outbox-index.sqlite3")
    assert index.marked() == []
    index.close()


async def _start_gateway(broker: MosquittoBroker, state_dir: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.agents.outbox_gateway",
        "--broker-url",
        broker.url,
        "--state-dir",
        str(state_dir),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        assert (await process.stdout.readline()).strip() == b"READY"
    return process


async def _receive(broker: MosquittoBroker, n: int) -> list[bytes]:
    """What the device `dev-1` (persistent session) receives, until `n` messages."""
    received: list[bytes] = []
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="dev-1", clean_session=False
    ) as device:
        await device.subscribe("devices/d1/cmd", qos=1)
        async with asyncio.timeout(20):
            async for message in device.messages:
                received.append(bytes(message.payload))
                if len(received) == n:
                    break
    return received


async def test_reply_committed_but_undelivered_is_sent_after_sigkill(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, identifier="dev-1", clean_session=False
    ) as device:  # the device's persistent session: the broker keeps what is sent to it
        await device.subscribe("devices/d1/cmd", qos=1)
    gateway = await _start_gateway(mosquitto, state_dir)
    try:
        await _publish(mosquitto, "pub", [("devices/d1/telemetry", b"hello")])
        assert await _receive(mosquitto, 1) == [b"echo:hello"]  # the device's link is open
        # The broker goes away; the agent then sends "poked" in a turn that commits.
        mosquitto.stop()
        assert gateway.stdin is not None and gateway.stdout is not None
        gateway.stdin.write(b"poke d1\n")
        await gateway.stdin.drain()
        async with asyncio.timeout(10):
            assert (await gateway.stdout.readline()).strip() == b"POKED d1 1"
        assert _outbox_rows(state_dir, "d1") == 1  # committed, not delivered
    finally:
        gateway.send_signal(signal.SIGKILL)
        await gateway.wait()
    mosquitto.start()
    gateway = await _start_gateway(mosquitto, state_dir)
    try:
        assert await _receive(mosquitto, 1) == [b"poked"]  # sent again by the new process
    finally:
        gateway.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await gateway.wait() == 0
    assert _outbox_rows(state_dir, "d1") == 0  # delivered, then deleted
