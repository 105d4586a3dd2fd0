"""Durable outputs end to end: real agent runtime (real SQLite), real MQTT bridge, real
Mosquitto. Replies are never dropped under a flood, and a reply committed but not yet
delivered when the gateway is SIGKILLed is delivered after the restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, RpcStream, callable
from gatewayd.agents.outbox import OutboxIndex
from gatewayd.agents.storage import agent_db_file
from protocols.frames import Ack, Data, Push
from protocols.link import Outcome
from protocols.mqtt import MqttBridge
from protocols.tcp import TcpListener, TcpSettings
from tests.agents.conftest import MemoryLink
from tests.agents.outbox_gateway import Echo, settings
from tests.brokers import MosquittoBroker
from tests.protocols.test_tcp import SECRETS, Device, connect_device, eventually
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


async def _publish(broker: MosquittoBroker, client_id: str, items: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=client_id, max_inflight_messages=100
    ) as client:
        client.pending_calls_threshold = 1000
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in chunk))


def _outbox_rows(state_dir: Path, agent_id: str, agent_class: str = "echo") -> int:
    path = agent_db_file(str(state_dir), agent_class, agent_id)
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
        # Every reply was delivered, so once the broker's PUBACKs are in (the device may see a
        # reply before the gateway reads its PUBACK) nothing is owed and, once the agents
        # hibernate, their outbox rows are gone.
        await wait_until(
            lambda: all(
                runtime._outbox.undelivered(("echo", f"d{p}")) == 0 for p in range(publishers)
            ),
            10,
            "every reply's PUBACK",
        )
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


async def _receive(broker: MosquittoBroker, until: bytes) -> list[bytes]:
    """What the device `dev-1` (persistent session) receives, until `until` arrives."""
    received: list[bytes] = []
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="dev-1", clean_session=False
    ) as device:
        await device.subscribe("devices/d1/cmd", qos=1)
        async with asyncio.timeout(20):
            async for message in device.messages:
                received.append(bytes(message.payload))
                if received[-1] == until:
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
        assert await _receive(mosquitto, b"echo:hello") == [b"echo:hello"]  # link is open
        # The broker goes away; the agent then sends "poked" in a turn that commits.
        mosquitto.stop()
        assert gateway.stdin is not None and gateway.stdout is not None
        gateway.stdin.write(b"poke d1\n")
        await gateway.stdin.drain()
        async with asyncio.timeout(10):
            assert (await gateway.stdout.readline()).strip() == b"POKED d1 1"
        # Committed, not delivered (with "echo:hello" if its PUBACK had not come back yet).
        assert 1 <= _outbox_rows(state_dir, "d1") <= 2
    finally:
        gateway.send_signal(signal.SIGKILL)
        await gateway.wait()
    mosquitto.start()
    gateway = await _start_gateway(mosquitto, state_dir)
    try:
        # Sent again by the new process (after "echo:hello" again, if that was still owed).
        assert (await _receive(mosquitto, b"poked"))[-1] == b"poked"
    finally:
        gateway.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await gateway.wait() == 0
    assert _outbox_rows(state_dir, "d1") == 0  # delivered, then deleted


class Pusher(Agent):
    """Answers each DATA with a PUSH (a durable output on a TCP device's link)."""

    def on_message(self, conn: Any, message: bytes | str) -> None:
        conn.send(b"cmd-for-" + (message.encode() if isinstance(message, str) else message))


async def _tcp_gateway(state_dir: Path, port: int) -> tuple[AgentRuntime, TcpListener]:
    runtime = AgentRuntime(AgentSettings(state_dir=state_dir), {"device": Pusher})
    await runtime.start()
    listener = TcpListener(
        TcpSettings(host="127.0.0.1", port=port, agent_class="device", secrets=SECRETS), runtime
    )
    await listener.start()
    return runtime, listener


async def test_tcp_push_keeps_its_seq_across_a_gateway_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    runtime, listener = await _tcp_gateway(state_dir, 0)
    port = listener.bound_port
    device = await connect_device(port)
    try:
        device.send(Data(1, b"a"))
        frames = [await device.recv(), await device.recv()]
        push = next(f for f in frames if isinstance(f, Push))
        assert push.payload == b"cmd-for-a" and not push.resend
        first_epoch = listener.push_epoch
        # The device does not acknowledge the push; the gateway stops and starts again.
    finally:
        await device.close()
        await listener.stop(drain_timeout_s=2)
        await runtime.drain(2)
        await runtime.close()
    runtime, listener = await _tcp_gateway(state_dir, port)
    try:
        device = await Device.connect(port)
        hello_ok = await device.hello()
        assert hello_ok.push_epoch == first_epoch  # same seq space: no re-apply, no loss
        again = await device.recv()
        assert isinstance(again, Push)
        assert (again.seq, again.payload) == (push.seq, b"cmd-for-a")
        device.send(Ack(again.seq))
        # The next push of the agent gets a larger seq than any before the restart.
        device.send(Data(2, b"b"))
        frames = [await device.recv(), await device.recv()]
        later = next(f for f in frames if isinstance(f, Push))
        assert later.payload == b"cmd-for-b" and later.seq > push.seq
        device.send(Ack(later.seq))
        await eventually(
            lambda: (
                runtime._outbox is not None
                and runtime._outbox.undelivered(("device", "dev-a")) == 0
            )
        )
        await device.close()
    finally:
        await listener.stop(drain_timeout_s=2)
        await runtime.drain(2)
        await runtime.close()
    assert _outbox_rows(state_dir, "dev-a", "device") == 0


async def test_push_sent_outside_a_turn_becomes_durable_in_a_turn_of_its_own(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    runtime, listener = await _tcp_gateway(state_dir, 0)
    try:
        device = await connect_device(listener.bound_port)
        device.send(Data(1, b"a"))
        frames = [await device.recv(), await device.recv()]
        first = next(f for f in frames if isinstance(f, Push))
        device.send(Ack(first.seq))
        [conn] = runtime._registry.open_of(("device", "dev-a"))
        conn.send(b"from a background task")  # no turn is running
        late = await device.recv()
        # It went through the outbox (a durable row, a seq from the agent's own sequence),
        # not around it with a seq of its own that a later durable push could collide with.
        assert isinstance(late, Push) and late.payload == b"from a background task"
        assert late.seq > first.seq
        assert _outbox_rows(state_dir, "dev-a", "device") >= 1  # kept until the ACK
        device.send(Data(2, b"b"))
        frames = [await device.recv(), await device.recv()]
        after = next(f for f in frames if isinstance(f, Push))
        assert after.seq > late.seq
        await device.close()
    finally:
        await listener.stop(drain_timeout_s=2)
        await runtime.drain(2)
        await runtime.close()


class Streamer(Agent):
    """A streaming RPC that pushes to its TCP device, then sends a chunk (a commit point)."""

    pushed: asyncio.Event

    @callable(streaming=True)
    async def push_then_chunk(self, stream: RpcStream) -> str:
        for conn in self.get_connections():
            if conn.transport == "tcp":
                conn.send(b"mid-stream")
        await stream.send("chunk")
        # Goes on only once the device has the push: it must leave at the commit point,
        # as a durable outbox row, not wait for the end of the turn.
        await type(self).pushed.wait()
        return "done"


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_device_output_before_a_commit_point_leaves_there_durably(
    tmp_path: Path, durability: str
) -> None:
    Streamer.pushed = asyncio.Event()
    state_dir = tmp_path / "state"
    settings = AgentSettings(state_dir=state_dir, durability=durability, turn_timeout_s=5)
    runtime = AgentRuntime(settings, {"device": Streamer})
    await runtime.start()
    listener = TcpListener(
        TcpSettings(host="127.0.0.1", port=0, agent_class="device", secrets=SECRETS), runtime
    )
    await listener.start()
    try:
        device = await connect_device(listener.bound_port)
        client = MemoryLink("device", "dev-a", transport="ws")
        await runtime.open_link(client, {})
        call = runtime.submit_message(
            client, json.dumps({"type": "gw.rpc", "id": 1, "method": "push_then_chunk"})
        )
        push = await device.recv()
        assert isinstance(push, Push) and push.payload == b"mid-stream"
        assert _outbox_rows(state_dir, "dev-a", "device") == 1  # committed with the chunk
        Streamer.pushed.set()
        async with asyncio.timeout(10):
            assert await call is Outcome.APPLIED
        device.send(Ack(push.seq))
        await eventually(lambda: runtime._outbox.undelivered(("device", "dev-a")) == 0)
        await device.close()
    finally:
        await listener.stop(drain_timeout_s=2)
        await runtime.drain(2)
        await runtime.close()
    assert _outbox_rows(state_dir, "dev-a", "device") == 0


async def test_outputs_left_with_a_stopped_bridge_go_out_through_the_next_one(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, identifier="dev-1", clean_session=False
    ) as device:
        await device.subscribe("devices/d1/cmd", qos=1)
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path / "state"), {"echo": Echo})
    await runtime.start()
    try:
        first = MqttBridge(settings(mosquitto.url), runtime)
        await first.start()
        await first.wait_connected(timeout_s=5)
        await _publish(mosquitto, "pub", [("devices/d1/telemetry", b"hello")])
        assert await _receive(mosquitto, b"echo:hello") == [b"echo:hello"]
        mosquitto.stop()
        assert await runtime.call("echo", "d1", "poke") == 1  # handed to `first`, unpublished
        await first.stop(drain_timeout_s=0.5)
        mosquitto.start()
        second = MqttBridge(settings(mosquitto.url), runtime)
        await second.start()
        try:
            assert (await _receive(mosquitto, b"poked"))[-1] == b"poked"
        finally:
            await second.stop(drain_timeout_s=2)
    finally:
        await runtime.drain(2)
        await runtime.close()
