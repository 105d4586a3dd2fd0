"""A group of real gatewayd members on a real NATS JetStream cluster: a member SIGKILLed
mid-stream, a member paused past its lease, a member joining. After each, every message
JetStream acknowledged to its publisher is in its agent's state exactly once (read from the
group's changelog, the state a next owner restores)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import aiomqtt
import nats
import nats.errors
import pytest

from gatewayd.cluster.naming import partition_of
from tests.cluster.group import (
    Group,
    Publisher,
    log_epochs,
    read_group_state,
    wait_serving,
    wait_settled,
)
from tests.waiting import wait_until

DEVICES = 24


async def _wait_all_applied(
    nc: nats.NATS, group: Group, publisher: Publisher, timeout_s: float
) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    wanted = len(publisher.acked)
    while True:
        try:
            state = await read_group_state(nc, group.partitions)
        except nats.errors.Error:  # e.g. a NATS node just died: JetStream elects leaders
            state = {}
        applied = sum(len(messages) for messages in state.values())
        if applied >= wanted:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"only {applied} of {wanted} acknowledged messages applied")
        await asyncio.sleep(0.5)


def _assert_exactly_once(state: dict[str, list[str]], publisher: Publisher) -> None:
    assert publisher.failed == 0
    counts = collections.Counter(
        (agent, message) for agent, messages in state.items() for message in messages
    )
    twice = [key for key, count in counts.items() if count > 1]
    assert twice == [], f"applied more than once: {twice[:10]}"
    missing = [key for key in publisher.acked if counts[key] != 1]
    assert missing == [], f"{len(missing)} acknowledged messages missing, e.g. {missing[:10]}"
    assert sum(counts.values()) == len(publisher.acked), "a message nobody published"


async def _publish_until(publisher: Publisher, fraction: float) -> asyncio.Task[None]:
    task = asyncio.create_task(publisher.run())
    while len(publisher.acked) < publisher.count * fraction and not task.done():
        await asyncio.sleep(0.02)
    return task


async def test_sigkill_a_member_mid_stream_loses_nothing_and_applies_nothing_twice(
    group: Group, nc: nats.NATS
) -> None:
    for name in ("m1", "m2", "m3"):
        group.add_member(name)
    owned = await wait_serving(nc, group.partitions, {"m1", "m2", "m3"}, timeout_s=30)
    victim_partitions = {p for p, owner in owned.items() if owner == "m2"}

    publisher = Publisher(nc, DEVICES, 2000)
    publishing = await _publish_until(publisher, 0.3)
    group.members["m2"].process.kill()
    killed_at = time.monotonic()
    # The killed member's partitions are served by the others within the lease (+ a
    # heartbeat to notice, + the restore).
    while True:
        now_owned = await wait_serving(nc, group.partitions, {"m1", "m3"}, timeout_s=30)
        if not victim_partitions & {p for p, o in now_owned.items() if o == "m2"}:
            break
    takeover_s = time.monotonic() - killed_at
    assert takeover_s < group.lease_s + 4 * group.heartbeat_s + 3.0, takeover_s
    await publishing

    state = await _wait_all_applied(nc, group, publisher, timeout_s=30)
    _assert_exactly_once(state, publisher)
    for device, messages in state.items():
        assert all(message for message in messages), device


async def test_a_member_paused_past_its_lease_writes_nothing_after_losing_ownership(
    group: Group, nc: nats.NATS
) -> None:
    m1 = group.add_member("m1")
    group.add_member("m2")
    await wait_serving(nc, group.partitions, {"m1", "m2"}, timeout_s=30)

    publisher = Publisher(nc, DEVICES, 1500)
    publishing = await _publish_until(publisher, 0.3)
    os.kill(m1.pid, signal.SIGSTOP)
    try:
        await wait_serving(nc, group.partitions, {"m2"}, timeout_s=30)
        assert m1.process.proc is not None and m1.process.proc.poll() is None
    finally:
        os.kill(m1.pid, signal.SIGCONT)
    # Resumed: it finds its lease expired and its partitions gone; it appends nothing.
    m1.process.wait_log("lost partition", timeout_s=10)
    await publishing
    state = await _wait_all_applied(nc, group, publisher, timeout_s=30)
    _assert_exactly_once(state, publisher)
    for partition in range(group.partitions):
        epochs = [epoch for epoch, _member in await log_epochs(nc, partition)]
        assert epochs == sorted(epochs), f"partition {partition}: an old epoch wrote late"
    # Its lease is gone, so it cannot take anything back until it heartbeats again; whatever
    # it takes later is under a new epoch (checked above: epochs never go back).
    assert "lost partition" in m1.log_text()


async def test_a_member_joining_takes_partitions_and_nothing_is_applied_twice(
    group: Group, nc: nats.NATS
) -> None:
    group.add_member("m1")
    group.add_member("m2")
    before = await wait_settled(nc, group.partitions, {"m1", "m2"}, timeout_s=30)

    publisher = Publisher(nc, DEVICES, 1500)
    publishing = await _publish_until(publisher, 0.3)
    group.add_member("m3")
    after = await wait_settled(nc, group.partitions, {"m1", "m2", "m3"}, timeout_s=30)
    moved = [p for p in after if after[p] != before[p]]
    assert moved and all(after[p] == "m3" for p in moved), (before, after)
    await publishing
    state = await _wait_all_applied(nc, group, publisher, timeout_s=30)
    _assert_exactly_once(state, publisher)

    # The operator's view agrees.
    config = str(group.members["m1"].config)
    shown = subprocess.run(
        [sys.executable, "-m", "gatewayd", "cluster", "status", "--json", "-c", config],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    status = json.loads(shown.stdout)
    assert {m["member"] for m in status["members"]} == {"m1", "m2", "m3"}
    assert {p["partition"]: p["owner"] for p in status["partitions"]} == after
    text = subprocess.run(
        [sys.executable, "-m", "gatewayd", "cluster", "status", "-c", config],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "PARTITION" in text and "m3" in text, text


async def _mqtt_client(port: int, name: str) -> aiomqtt.Client:
    """Connected; NATS 2.9 creates its MQTT streams on the first connects and may time them
    out under load (the client is told to try again): retry a few times."""
    for attempt in range(6):
        client = aiomqtt.Client("127.0.0.1", port, identifier=name, timeout=10)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError:
            if attempt == 5:
                raise
            continue
        return client
    raise AssertionError("unreachable")


async def test_mqtt_devices_on_the_nats_mqtt_listener_survive_a_member_kill(
    group: Group, nc: nats.NATS
) -> None:
    """Devices do not change: real MQTT clients publish QoS 1 to NATS's MQTT listener (a
    PUBACK = acknowledged), their topics become the partitioned subjects, and the agents'
    echoes come back on `gw/out/<id>`."""
    group.add_member("m1")
    group.add_member("m2")
    await wait_serving(nc, group.partitions, {"m1", "m2"}, timeout_s=30)
    acked: list[tuple[str, str]] = []
    echoed: list[str] = []
    killed = asyncio.Event()
    clients = []
    for index in range(6):  # one at a time: see _mqtt_client
        port = group.nats.nodes[index % len(group.nats.nodes)].mqtt_port
        clients.append(await _mqtt_client(port, f"mqtt{index}"))

    async def device(index: int, client: aiomqtt.Client, count: int) -> None:
        name = f"mqtt{index}"
        await client.subscribe(f"gw/out/{name}", qos=0)

        async def read() -> None:
            async for message in client.messages:
                echoed.append(bytes(message.payload).decode())

        reader = asyncio.create_task(read())
        try:
            for serial in range(count):
                text = f"{name}:{serial}"
                await client.publish(f"devices/{name}/telemetry", text.encode(), qos=1)
                acked.append((name, text))
                if serial == count // 3 and index == 0:
                    killed.set()
            await wait_until(lambda: f"{name}:{count - 1}" in echoed, 30, f"{name}'s last echo")
        finally:
            reader.cancel()

    try:
        devices = asyncio.gather(*(device(i, c, 60) for i, c in enumerate(clients)))
        await killed.wait()
        group.members["m1"].process.kill()
        await devices
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
    state: dict[str, list[str]] = {}
    deadline = time.monotonic() + 30
    while sum(len(v) for v in state.values()) < len(acked) and time.monotonic() < deadline:
        state = await read_group_state(nc, group.partitions)
        await asyncio.sleep(0.5)
    counts = collections.Counter((agent, m) for agent, ms in state.items() for m in ms)
    assert [key for key in acked if counts[key] != 1] == []
    assert sum(counts.values()) == len(acked)


async def test_schedules_run_once_on_the_owner_and_overdue_ones_after_a_failover(
    group: Group, nc: nats.NATS
) -> None:
    group.add_member("m1")
    group.add_member("m2")
    owned = await wait_serving(nc, group.partitions, {"m1", "m2"}, timeout_s=30)
    agent = "sched1"
    owner = owned[partition_of(agent, group.partitions)]
    js = nc.jetstream(timeout=15)

    async def messages() -> list[str]:
        return (await read_group_state(nc, group.partitions)).get(agent, [])

    async def wait_for(text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in await messages():
            assert time.monotonic() < deadline, f"{text!r} never applied"
            await asyncio.sleep(0.2)

    # One schedule fires on the owner before it dies, one is still due when it dies.
    await js.publish(f"devices.{agent}.telemetry", b"schedule:0.1:early")
    await js.publish(f"devices.{agent}.telemetry", b"schedule:4:late")
    await wait_for("fired:early")
    group.members[owner].process.kill()
    survivor = ({"m1", "m2"} - {owner}).pop()
    await wait_serving(nc, group.partitions, {survivor}, timeout_s=30)
    await wait_for("fired:late")
    await js.publish(f"devices.{agent}.telemetry", b"after")
    await wait_for("after")
    seen = await messages()
    assert seen.count("fired:early") == 1 and seen.count("fired:late") == 1, seen


@pytest.mark.skipif(
    os.environ.get("GATEWAYD_TEST_NATS_NODE_KILL") != "1",
    reason="known gap (issue 14), opt-in: after a NATS node is SIGKILLed, partitions whose "
    "single-replica consumer lived on it recover only after 10-60 s of retakes on a 2-core "
    "machine (consumer placement keeps choosing the dead peer), past the suite's time budget; "
    "in the runs that finished nothing acknowledged was lost. Run it with "
    "GATEWAYD_TEST_NATS_NODE_KILL=1 scripts/test tests/cluster -k nats_node",
)
@pytest.mark.timeout(300)
async def test_sigkill_a_nats_node_mid_stream_loses_nothing(group: Group, nc: nats.NATS) -> None:
    group.add_member("m1")
    group.add_member("m2")
    await wait_serving(nc, group.partitions, {"m1", "m2"}, timeout_s=30)
    publisher = Publisher(nc, DEVICES, 1500)
    publishing = await _publish_until(publisher, 0.3)
    group.nats.kill(1)  # a replica (perhaps the leader) of every stream and bucket
    await publishing
    state = await _wait_all_applied(nc, group, publisher, timeout_s=40)
    _assert_exactly_once(state, publisher)
    await wait_serving(nc, group.partitions, {"m1", "m2"}, timeout_s=30)
