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
from typing import Protocol

import aiomqtt
import nats
import nats.errors
import pytest

from gatewayd.agents.storage import agent_db_file
from gatewayd.cluster.naming import Names, partition_of
from tests.cluster.failover_timing import AckClock, Kill, LeaderWatch, applied_times
from tests.cluster.group import (
    AGENT_CLASS,
    GROUP,
    Group,
    Publisher,
    log_epochs,
    owners,
    read_group_state,
    read_replies,
    wait_serving,
    wait_settled,
)
from tests.waiting import eventually, wait_until

DEVICES = 24
# After a NATS node's loss, every acknowledged message is applied within this many seconds
# of the later of the leader elections' end and its own acknowledgement (measured: see
# test_sigkill_a_nats_node_mid_stream_loses_nothing).
_APPLIED_AFTER_ELECTIONS_S = 5.0


class _Acked(Protocol):
    """What a publisher had acknowledged: `(device id, message)` pairs, and failures."""

    acked: list[tuple[str, str]]
    failed: int


async def _wait_all_applied(
    nc: nats.NATS, group: Group, publisher: _Acked, timeout_s: float, request_s: float = 15.0
) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    wanted = len(publisher.acked)
    while True:
        try:
            state = await read_group_state(nc, group.partitions, timeout_s=request_s)
        except nats.errors.Error:  # e.g. a NATS node just died: JetStream elects leaders
            state = {}
        applied = sum(len(messages) for messages in state.values())
        if applied >= wanted:
            return state
        if time.monotonic() > deadline:
            have = {(agent, m) for agent, ms in state.items() for m in ms}
            short = collections.Counter(
                partition_of(agent, group.partitions)
                for agent, m in publisher.acked
                if (agent, m) not in have
            )
            raise AssertionError(
                f"only {applied} of {wanted} acknowledged messages applied; missing by "
                f"partition: {dict(short)}"
            )
        await asyncio.sleep(0.5)


def _assert_exactly_once(state: dict[str, list[str]], publisher: _Acked) -> None:
    assert publisher.failed == 0
    counts = collections.Counter(
        (agent, message) for agent, messages in state.items() for message in messages
    )
    twice = [key for key, count in counts.items() if count > 1]
    assert twice == [], f"applied more than once: {twice[:10]}"
    missing = [key for key in publisher.acked if counts[key] != 1]
    assert missing == [], f"{len(missing)} acknowledged messages missing, e.g. {missing[:10]}"
    assert sum(counts.values()) == len(publisher.acked), "a message nobody published"


async def _wait_files_follow_owners(
    group: Group, nc: nats.NATS, members: list[str], timeout_s: float = 15.0
) -> None:
    """Each member's data directory holds the databases of exactly the devices' agents whose
    partition it owns: a member that gave a partition away (or lost it) deleted its files."""
    devices = [Publisher.device(index) for index in range(DEVICES)]
    deadline = time.monotonic() + timeout_s
    while True:
        owned = {p: owner for p, (owner, _epoch) in (await owners(nc)).items()}
        wrong = {}
        for name in members:
            state_dir = str(group.members[name].dir / "state" / "cluster")
            held = {d for d in devices if os.path.exists(agent_db_file(state_dir, AGENT_CLASS, d))}
            wanted = {d for d in devices if owned.get(partition_of(d, group.partitions)) == name}
            if held != wanted:
                wrong[name] = {"extra": sorted(held - wanted), "missing": sorted(wanted - held)}
        if not wrong:
            return
        assert time.monotonic() < deadline, f"local files do not follow the owners: {wrong}"
        await asyncio.sleep(0.1)


async def _publish_until(publisher: Publisher, fraction: float) -> asyncio.Task[None]:
    task = asyncio.create_task(publisher.run())
    await wait_until(
        lambda: len(publisher.acked) >= publisher.count * fraction or task.done(),
        60,
        f"{fraction:.0%} of the messages acknowledged",
    )
    return task


async def _kill_m2_and_see_takeover(
    group: Group, nc: nats.NATS, victim_partitions: set[int]
) -> float:
    """SIGKILL member m2: its partitions are served by m1 and m3 within the lease (+ a
    heartbeat to notice, + the restore); how long that took."""
    group.members["m2"].process.kill()
    killed_at = time.monotonic()
    while True:
        now_owned = await wait_serving(nc, group.partitions, {"m1", "m3"}, timeout_s=30)
        if not victim_partitions & {p for p, o in now_owned.items() if o == "m2"}:
            break
    takeover_s = time.monotonic() - killed_at
    assert takeover_s < group.lease_s + 4 * group.heartbeat_s + 3.0, takeover_s
    return takeover_s


async def test_sigkill_a_member_mid_stream_loses_nothing_and_applies_nothing_twice(
    group: Group, nc: nats.NATS
) -> None:
    for name in ("m1", "m2", "m3"):
        group.add_member(name)
    owned = await wait_serving(nc, group.partitions, {"m1", "m2", "m3"}, timeout_s=30)
    victim_partitions = {p for p, owner in owned.items() if owner == "m2"}

    publisher = Publisher(nc, DEVICES, 2000)
    publishing = await _publish_until(publisher, 0.3)
    await _kill_m2_and_see_takeover(group, nc, victim_partitions)
    await publishing

    state = await _wait_all_applied(nc, group, publisher, timeout_s=30)
    _assert_exactly_once(state, publisher)
    for device, messages in state.items():
        assert all(message for message in messages), device
    await _assert_every_reply_once(nc, state)


async def _assert_every_reply_once(nc: nats.NATS, state: dict[str, list[str]]) -> None:
    """Every applied message's reply (the Recorder echoes each message) is in the replies
    stream, exactly once: sent at least once (a new owner sends what its predecessor
    committed but had not sent), and a resend was dropped by JetStream's message-id dedup."""
    wanted = collections.Counter(
        (agent, message) for agent, messages in state.items() for message in messages
    )
    replies: list[tuple[str, str]] = []
    deadline = time.monotonic() + 30
    while True:
        replies = await read_replies(nc)
        if len(replies) >= len(wanted) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    got = collections.Counter(replies)
    missing = [key for key in wanted if got[key] == 0]
    assert missing == [], f"{len(missing)} replies never sent, e.g. {missing[:5]}"
    twice = [key for key, count in got.items() if count > 1]
    assert twice == [], f"replies stored twice: {twice[:5]}"
    assert set(got) == set(wanted), "a reply for a message never applied"


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
    # It deleted the files of what it lost, and restored from the log what it took back.
    await wait_settled(nc, group.partitions, {"m1", "m2"}, timeout_s=30)
    await _wait_files_follow_owners(group, nc, ["m1", "m2"])


async def test_a_fourth_member_joining_takes_few_partitions_and_nothing_is_applied_twice(
    group: Group, nc: nats.NATS
) -> None:
    # The scenario: a 4th member joins 3 that serve a stream of messages.
    for name in ("m1", "m2", "m3"):
        group.add_member(name)
    before = await wait_settled(nc, group.partitions, {"m1", "m2", "m3"}, timeout_s=30)

    publisher = Publisher(nc, DEVICES, 1500)
    publishing = await _publish_until(publisher, 0.3)
    group.add_member("m4")
    members = {"m1", "m2", "m3", "m4"}
    after = await wait_settled(nc, group.partitions, members, timeout_s=30)
    moved = [p for p in after if after[p] != before[p]]
    # Only partitions the newcomer takes move (rendezvous hashing: ~P/4 of them, never the
    # others' partitions among themselves).
    assert moved and all(after[p] == "m4" for p in moved), (before, after)
    assert len(moved) <= group.partitions // 2, (before, after)
    await publishing
    state = await _wait_all_applied(nc, group, publisher, timeout_s=30)
    _assert_exactly_once(state, publisher)
    # m1-m3 deleted the files of the agents that moved to m4 (local listings scan them).
    await _wait_files_follow_owners(group, nc, sorted(members))

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
    assert {m["member"] for m in status["members"]} == members
    assert {p["partition"]: p["owner"] for p in status["partitions"]} == after
    text = subprocess.run(
        [sys.executable, "-m", "gatewayd", "cluster", "status", "-c", config],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "PARTITION" in text and "m4" in text, text


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


# The load: 10,000 QoS 1 messages (~35 s of streaming on 2 cores; the cluster tests
# run beside the rest of the suite). GATEWAYD_TEST_CLUSTER_MESSAGES=1200 for a quicker run.
MQTT_MESSAGES = int(os.environ.get("GATEWAYD_TEST_CLUSTER_MESSAGES", "10000"))
MQTT_DEVICES = 10


class _MqttDevices:
    """`acked`/`failed` like Publisher: what the MQTT listener PUBACKed."""

    def __init__(self) -> None:
        self.acked: list[tuple[str, str]] = []
        self.failed = 0


@pytest.mark.timeout(300)
async def test_mqtt_devices_stream_qos1_and_a_member_is_sigkilled_mid_stream(
    group: Group, nc: nats.NATS
) -> None:
    """Devices do not change: real MQTT clients publish QoS 1 to NATS's MQTT listener (a
    PUBACK = acknowledged), their topics become the partitioned subjects, and the agents'
    echoes come back on `gw/out/<id>`. One of three members is SIGKILLed mid-stream: its
    partitions are served by the others within the lease, every acknowledged message is in
    its agent's state exactly once, and every reply is in the replies stream exactly once."""
    for name in ("m1", "m2", "m3"):
        group.add_member(name)
    owned = await wait_serving(nc, group.partitions, {"m1", "m2", "m3"}, timeout_s=30)
    victim_partitions = {p for p, owner in owned.items() if owner == "m2"}
    devices = _MqttDevices()
    echoed: set[str] = set()
    clients = []
    for index in range(MQTT_DEVICES):  # one at a time: see _mqtt_client
        port = group.nats.nodes[index % len(group.nats.nodes)].mqtt_port
        clients.append(await _mqtt_client(port, f"mqtt{index}"))
    per_device = MQTT_MESSAGES // MQTT_DEVICES
    started = time.monotonic()

    async def device(index: int, client: aiomqtt.Client) -> None:
        name = f"mqtt{index}"
        await client.subscribe(f"gw/out/{name}", qos=0)

        async def read() -> None:
            async for message in client.messages:
                echoed.add(bytes(message.payload).decode())

        reader = asyncio.create_task(read())
        try:
            for serial in range(per_device):
                text = f"{name}:{serial}"
                await client.publish(f"devices/{name}/telemetry", text.encode(), qos=1)
                devices.acked.append((name, text))
            await wait_until(lambda: f"{name}:{per_device - 1}" in echoed, 60, f"{name}'s echo")
        finally:
            reader.cancel()

    try:
        streaming = asyncio.gather(*(device(i, c) for i, c in enumerate(clients)))
        while len(devices.acked) < MQTT_MESSAGES * 0.3:
            await asyncio.sleep(0.02)
        takeover_s = await _kill_m2_and_see_takeover(group, nc, victim_partitions)
        await streaming
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
    streamed_s = time.monotonic() - started
    state = await _wait_all_applied(nc, group, devices, timeout_s=60)
    _assert_exactly_once(state, devices)
    await _assert_every_reply_once(nc, state)
    print(
        f"MQTT: {len(devices.acked)} QoS 1 messages from {MQTT_DEVICES} devices in "
        f"{streamed_s:.1f}s ({len(devices.acked) / streamed_s:.0f}/s) with a member SIGKILLed "
        f"mid-stream; takeover {takeover_s:.1f}s"
    )


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
        await eventually(messages, lambda seen: text in seen, 30, f"{text!r} applied")

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


async def test_sigkill_a_nats_node_mid_stream_loses_nothing(group: Group, nc: nats.NATS) -> None:
    """A NATS node dies mid-stream (a replica, perhaps the leader, of every stream and bucket,
    and perhaps the meta leader): the members ride out the leader elections (their ingest
    consumers switch to a standby or are recreated on the live nodes, their leases wait for
    the bucket) and every acknowledged message is applied once, with no takeover storm, and
    no stall beyond the elections: every message is applied within a few seconds of the
    later of the elections' end and its own acknowledgement."""
    group.add_member("m1")
    group.add_member("m2")
    await wait_settled(nc, group.partitions, {"m1", "m2"}, timeout_s=30)
    records = await owners(nc, partitions=group.partitions)
    publisher = Publisher(nc, DEVICES, 1500, timeout_s=2.0)
    publishing = await _publish_until(publisher, 0.3)
    acked_before = len(publisher.acked)
    names = Names(GROUP, "gw.in")
    # What the members need a leader of to apply a message: the ingest stream, the
    # changelog, both buckets (the lease), and the meta group (consumer creates).
    watch = LeaderWatch(
        group.nats,
        [names.ingest_stream, names.log_stream, f"KV_{names.members_bucket}",
         f"KV_{names.partitions_bucket}", "META"],
    )  # fmt: skip
    watch.note_before()
    group.nats.kill(1)  # a replica (perhaps the leader) of every stream and bucket
    kill = Kill()
    acks = AckClock(publisher, kill)
    sampling = asyncio.create_task(acks.run())
    watching = asyncio.create_task(watch.run(kill, timeout_s=40))
    try:
        await publishing
        # (Each read's requests time out soon: one sent to a stream that has no leader yet
        # is never answered, and is sent again.)
        state = await _wait_all_applied(nc, group, publisher, timeout_s=40, request_s=2.0)
        await watching
    finally:
        sampling.cancel()
        watching.cancel()
    recovered_s = kill.since()
    _assert_exactly_once(state, publisher)
    applied = await applied_times(nc, group.partitions, kill)
    # The elections are over when each of those has a leader again and a publish to the
    # ingest stream was acknowledged after its leader was known.
    assert watch.done_at() < 40, f"leaders known again: {watch.known}"
    ingest_s = watch.known[names.ingest_stream]
    first_ack_s = acks.first_after(ingest_s)
    elected_s = max(watch.done_at(), first_ack_s if first_ack_s < float("inf") else 0.0)
    # Each message: applied how long after the later of the elections' end and its own ack
    # (negative: applied before the kill, or before the elections were over).
    late = [
        applied[key] - max(elected_s, acks.at(index)) for index, key in enumerate(publisher.acked)
    ]
    last_applied_s = max(applied[key] for key in publisher.acked)
    dead = group.nats.nodes[1].name
    caused = sorted(name for name, leader in watch.before.items() if leader == dead)
    known = ", ".join(f"{name} {at:.1f}" for name, at in sorted(watch.known.items()))
    print(
        f"NATS node kill: {acked_before} acked before, all {len(publisher.acked)} applied "
        f"{last_applied_s:.1f}s after the kill (read back at {recovered_s:.1f}s); elections "
        f"over at {elected_s:.1f}s (leaders known again: {known}; {dead} led "
        f"{', '.join(caused) or 'nothing'}); last publish acked "
        f"{acks.at(len(publisher.acked) - 1):.1f}s; applied - elections "
        f"{last_applied_s - elected_s:.1f}s; worst wait past max(elections, own ack) "
        f"{max(late, default=0.0):.1f}s"
    )
    _print_applied_timeline(applied, group.partitions)
    assert max(late, default=0.0) < _APPLIED_AFTER_ELECTIONS_S, (max(late), elected_s)
    assert last_applied_s < 45, last_applied_s
    await _assert_every_reply_once(nc, state)
    # Nobody took anything over: every partition kept its owner and epoch. (Read from the
    # bucket; listing the consumers may wait on the dead node's.)
    now: dict[int, tuple[str, int]] = {}
    deadline = time.monotonic() + 30
    while now != records and time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.Error):
            now = await owners(nc, partitions=group.partitions)
        await asyncio.sleep(0.2)
    assert now == records


def _print_applied_timeline(applied: dict[tuple[str, str], float], partitions: int) -> None:
    """How many messages were applied in each half second around the kill, and each
    partition's first and last message applied after it (where a stall shows)."""
    last = max(applied.values(), default=0.0)
    rate = collections.Counter(int(moment // 0.5) for moment in applied.values())
    print("applied per 0.5 s from -2 s:", [rate[i] for i in range(-4, int(last * 2) + 1)])
    by_partition: dict[int, list[float]] = collections.defaultdict(list)
    for (agent, _message), moment in applied.items():
        if moment > 0:
            by_partition[partition_of(agent, partitions)].append(moment)
    spans = {p: f"{min(ms):.1f}-{max(ms):.1f}" for p, ms in sorted(by_partition.items())}
    print("applied after the kill, by partition:", spans)
