"""A real group for tests and bench/cluster.py: a NATS JetStream cluster plus gatewayd member
processes (`python -m gatewayd run`), and a reader of the group's truth (the changelog).

    group = Group(tmp_path, partitions=8)
    group.start_nats()
    member = group.add_member("m1")
    ...
    state = await read_group_state(group.urls, partitions=8)   # {agent id: [messages]}
    group.stop()
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.js.errors import NotFoundError

from gatewayd.cluster.changelog import PartitionLog
from gatewayd.cluster.naming import Names
from tests.cluster.nats_cluster import NATS_BIN, NatsCluster
from tests.gatewayd.daemon_process import GatewayProcess
from tests.gatewayd.notify import NotifySocket

GROUP = "test"
AGENT_CLASS = "rec"
DEVICE_SUBJECT = "devices.*.telemetry"
API_TOKEN = "cluster-test-token-0123456789"
_NO_CLIENTS = "[listeners.websocket]\nenabled = false\n"
# Group(clients=True): each member serves WebSocket clients and the HTTP API (MCP) on free
# ports, and advertises them in its heartbeat record (`addresses`, read by `addresses()`).
_CLIENTS = (
    '[listeners.websocket]\nenabled = true\nbind = "127.0.0.1:0"\n'
    '[api]\nenabled = true\nbind = "127.0.0.1:0"\ntokens_file = "{tokens}"\n'
)


def device_mapping(partitions: int) -> dict[str, str]:
    """The NATS subject mapping that partitions device subjects for the group."""
    return {DEVICE_SUBJECT: f"gw.in.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"}


class Member:
    """One gatewayd member process."""

    def __init__(self, group: Group, name: str) -> None:
        self.name = name
        self.dir = group.work_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "gatewayd.toml"
        servers = ", ".join(f'"{url}"' for url in group.urls)
        self.config.write_text(
            f'[gateway]\nstate_dir = "{self.dir / "state"}"\nlog_level = "info"\n'
            "[http]\nenabled = false\n"
            + (_CLIENTS.format(tokens=group.tokens_file) if group.clients else _NO_CLIENTS)
            + group.extra_config
            + f'[agents.classes.{AGENT_CLASS}]\nclass = "tests.cluster.cluster_agents:Recorder"\n'
            "[cluster]\nenabled = true\n"
            f'group = "{GROUP}"\nmember = "{name}"\nservers = [{servers}]\n'
            f'agent_class = "{AGENT_CLASS}"\npartitions = {group.partitions}\n'
            f'replicas = {group.replicas}\nlease = "{group.lease_s}s"\n'
            f'heartbeat = "{group.heartbeat_s}s"\nsnapshot_every = {group.snapshot_every}\n'
            f"durable_replies = {'true' if group.durable_replies else 'false'}\n"
        )
        self.notify = NotifySocket(self.dir, abstract=True)
        self.process = GatewayProcess(self.config, self.notify)

    def start(self) -> None:
        self.process.start(wait_ready=True)

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def log_text(self) -> str:
        return self.process.log_text()


class Group:
    def __init__(
        self,
        work_dir: Path | str | None = None,
        *,
        partitions: int = 8,
        nats_nodes: int = 3,
        lease_s: float = 5.0,
        heartbeat_s: float = 1.0,
        snapshot_every: int = 1000,
        clients: bool = False,
        extra_config: str = "",
        durable_replies: bool = True,
    ) -> None:
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="gw-group-"))
        self.clients = clients
        self.extra_config = extra_config  # TOML appended to every member's config
        self.tokens_file = self.work_dir / "api-tokens.toml"
        if clients:
            self.tokens_file.write_text(
                f'[tokens.test]\ntoken = "{API_TOKEN}"\nscopes = ["*"]\nclasses = ["*"]\n'
            )
            self.tokens_file.chmod(0o600)
        self.partitions = partitions
        self.replicas = min(3, nats_nodes)
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.snapshot_every = snapshot_every
        self.durable_replies = durable_replies
        self.nats = NatsCluster(
            self.work_dir / "nats", nodes=nats_nodes, mappings=device_mapping(partitions)
        )
        self.members: dict[str, Member] = {}

    @property
    def urls(self) -> list[str]:
        return self.nats.urls

    def start_nats(self) -> None:
        if not Path(NATS_BIN).exists():
            raise RuntimeError(f"nats-server not found at {NATS_BIN}: run scripts/setup")
        self.nats.start()

    def add_member(self, name: str) -> Member:
        member = Member(self, name)
        self.members[name] = member
        member.start()
        return member

    def stop(self) -> None:
        for member in self.members.values():
            proc = member.process.proc
            if proc is not None and proc.poll() is None:
                with _suppress():
                    os.kill(proc.pid, 18)  # SIGCONT: a paused member must be able to stop
                member.process.stop(timeout_s=20)
            member.notify.sock.close()
        self.nats.stop()


class _suppress:
    """Like contextlib.suppress(Exception), in a form mypy reads as "may swallow"."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> bool:
        return exc_type is not None and issubclass(exc_type, Exception)


async def _records(nc: nats.NATS, bucket: str) -> dict[str, dict[str, Any]]:
    """Every JSON record of a KV bucket by key (none while the bucket has no keys or cannot
    be read; a key whose record cannot be read is left out)."""
    kv = await nc.jetstream(timeout=15).key_value(bucket)
    found: dict[str, dict[str, Any]] = {}
    try:
        keys = await kv.keys()
    except Exception:
        return found
    for key in keys:
        with _suppress():
            entry = await kv.get(key)
            found[key] = json.loads(entry.value or b"{}")
    return found


async def owners(
    nc: nats.NATS, group: str = GROUP, partitions: int | None = None
) -> dict[int, tuple[str, int]]:
    """`{partition: (owner, epoch)}` from the group's KV bucket. With `partitions`, each key
    is read directly (no listing: listing the keys needs a consumer, which may wait for a
    dead NATS node's replica)."""
    names = Names(group, "gw.in")
    if partitions is None:
        records = await _records(nc, names.partitions_bucket)
    else:
        kv = await nc.jetstream(timeout=15).key_value(names.partitions_bucket)
        records = {}
        for partition in range(partitions):
            key = names.partition_key(partition)
            with _suppress():
                records[key] = json.loads((await kv.get(key)).value or b"{}")
    return {
        int(key[1:]): (raw.get("owner", ""), int(raw.get("epoch", 0)))
        for key, raw in records.items()
    }


async def addresses(nc: nats.NATS, group: str = GROUP) -> dict[str, dict[str, str]]:
    """`{member: {"ws": url, "api": url}}` as the members' heartbeat records advertise them."""
    records = await _records(nc, Names(group, "gw.in").members_bucket)
    return {key: dict(raw.get("addresses") or {}) for key, raw in records.items()}


async def serving(nc: nats.NATS, partitions: int, group: str = GROUP) -> dict[int, str]:
    """Partitions whose current owner has created its epoch's consumer: `{partition: owner}`."""
    names = Names(group, "gw.in")
    js = nc.jetstream(timeout=15)
    try:
        consumers = {c.name for c in await js.consumers_info(names.ingest_stream)}
    except NotFoundError:
        return {}
    live = {Names.consumer_partition_epoch(name) for name in consumers}
    found = {}
    # Each partition's key read directly: listing the bucket's keys needs a consumer, whose
    # first answer can be lost on a busy box and then never comes (the wait hung the test).
    for partition, (owner, epoch) in (await owners(nc, group, partitions)).items():
        if owner and (partition, epoch) in live:
            found[partition] = owner
    return {p: found[p] for p in sorted(found) if p < partitions}


# The most one look at who serves what may take; the callers poll until their own deadline.
SERVING_READ_S = 20.0


async def _serving_now(nc: nats.NATS, partitions: int) -> dict[int, str]:
    try:
        return await asyncio.wait_for(serving(nc, partitions), SERVING_READ_S)
    except (nats.errors.Error, TimeoutError):  # leaders being elected, a lost answer: ask again
        return {}


async def wait_serving(
    nc: nats.NATS, partitions: int, members: set[str], timeout_s: float
) -> dict[int, str]:
    """Wait until every partition is served and exactly `members` serve them."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await _serving_now(nc, partitions)
        if len(found) == partitions and set(found.values()) == members:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"partitions not served by {sorted(members)} in time: {found}")
        await asyncio.sleep(0.1)


async def wait_settled(
    nc: nats.NATS, partitions: int, members: set[str], timeout_s: float
) -> dict[int, str]:
    """Wait until every partition is served by its preferred owner among `members` (the
    rendezvous choice): hand-overs still in flight when `wait_serving` returns are done."""
    from gatewayd.cluster.naming import preferred_owner

    wanted = {p: preferred_owner(p, sorted(members)) for p in range(partitions)}
    deadline = time.monotonic() + timeout_s
    found: dict[int, str] = {}
    while found != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"partitions not settled on {wanted} in time: {found}")
        await asyncio.sleep(0.1)
        found = await _serving_now(nc, partitions)
    return found


async def read_group_state(
    nc: nats.NATS, partitions: int, group: str = GROUP, timeout_s: float = 15.0
) -> dict[str, list[str]]:
    """Every agent's `seen` messages as the group's changelog (snapshot + log) holds them.
    `timeout_s`: how long each JetStream request may wait (a stream electing its leader
    answers none)."""
    names = Names(group, "gw.in")
    js = nc.jetstream(timeout=timeout_s)
    snapshots = await js.object_store(names.snapshots_bucket)
    state: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for partition in range(partitions):
            log = PartitionLog(js, names, partition, 0, "reader", max_payload=nc.max_payload)
            report = await log.restore(snapshots)
            for (_cls, agent_id), image in report.images.items():
                path = os.path.join(scratch, f"{partition}-{len(state)}.sqlite3")
                with open(path, "wb") as out:
                    out.write(image)
                conn = sqlite3.connect(path)
                try:
                    rows = conn.execute("SELECT message FROM seen ORDER BY rowid").fetchall()
                except sqlite3.OperationalError:
                    rows = []
                finally:
                    conn.close()
                state[agent_id] = [row[0] for row in rows]
    return state


async def log_epochs(nc: nats.NATS, partition: int, group: str = GROUP) -> list[tuple[int, str]]:
    """`(epoch, member)` of every message in a partition's changelog, in order."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from gatewayd.cluster.pages import LogMessage

    names = Names(group, "gw.in")
    js = nc.jetstream(timeout=15)
    try:
        last = (await js.get_last_msg(names.log_stream, names.log_subject(partition))).seq or 0
    except NotFoundError:
        return []
    sub = await js.pull_subscribe(
        names.log_subject(partition),
        stream=names.log_stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=5.0
        ),
    )
    found: list[tuple[int, str]] = []
    seq = 0
    while seq < last:
        for msg in await sub.fetch(256, timeout=5.0):
            seq = msg.metadata.sequence.stream
            message = LogMessage.decode(msg.data)
            found.append((message.epoch, message.member))
    await sub.unsubscribe()
    return found


class Publisher:
    """Publishes `count` device messages through JetStream (each acknowledged by a PubAck),
    `window` at a time; `acked` lists the messages JetStream confirmed."""

    def __init__(
        self, nc: nats.NATS, devices: int, count: int, window: int = 64, timeout_s: float = 15.0
    ) -> None:
        self._js = nc.jetstream(timeout=timeout_s)
        self._timeout_s = timeout_s
        self.devices = devices
        self.count = count
        self.window = window
        self.acked: list[tuple[str, str]] = []  # (device id, message)
        self.failed = 0
        self.sent = 0

    @staticmethod
    def device(index: int) -> str:
        return f"dev{index}"

    async def run(self) -> None:
        pending: set[asyncio.Task[None]] = set()
        for index in range(self.count):
            device = self.device(index % self.devices)
            message = f"m{index}"
            pending.add(asyncio.create_task(self._one(device, message)))
            self.sent += 1
            if len(pending) >= self.window:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.wait(pending)

    async def _one(self, device: str, message: str) -> None:
        # Retried for a while: a NATS node's loss makes publishes fail fast ("no responders")
        # for as long as the stream elects a leader (~8 s on nats-server 2.9).
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                # The message id lets JetStream drop a retry of a publish that did land.
                await self._js.publish(
                    f"devices.{device}.telemetry",
                    message.encode(),
                    timeout=self._timeout_s,
                    headers={"Nats-Msg-Id": message},
                )
            except Exception:
                await asyncio.sleep(0.2)
                continue
            self.acked.append((device, message))
            return
        self.failed += 1


async def read_stream(
    js: Any, stream: str, last_seq: int, filter_subject: str | None = None
) -> list[Any]:
    """Every message of `stream` (of `filter_subject`, when given) up to stream sequence
    `last_seq`, in order, read through a one-replica consumer without acks; one that lands on
    a NATS node that is down, or loses a delivery, is replaced."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    for _attempt in range(10):
        try:
            info = await js.add_consumer(
                stream,
                ConsumerConfig(
                    filter_subject=filter_subject,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=5.0,
                    mem_storage=True,
                    num_replicas=1,
                ),
                timeout=2.0,
            )
        except nats.errors.Error:
            continue
        sub = await js.pull_subscribe_bind(info.name, stream=stream)
        found: list[Any] = []
        try:
            while not found or found[-1].metadata.sequence.stream < last_seq:
                for msg in await sub.fetch(512, timeout=2.0):
                    if msg.metadata.sequence.consumer != len(found) + 1:
                        raise nats.errors.TimeoutError  # a delivery lost (no acks): again
                    found.append(msg)
        except nats.errors.Error:
            continue
        finally:
            with _suppress():
                await sub.unsubscribe()
        return found
    raise AssertionError(f"stream {stream} ({filter_subject or 'all'}) could not be read whole")


async def read_replies(nc: nats.NATS, group: str = GROUP) -> list[tuple[str, str]]:
    """Every reply in the group's replies stream, in order: `(agent id, payload)`."""
    names = Names(group, "gw.in")
    js = nc.jetstream(timeout=15)
    for _attempt in range(10):
        try:
            state = (await js.stream_info(names.replies_stream)).state
            break
        except nats.errors.Error:
            continue
    else:
        raise AssertionError("the replies stream's info could not be read")
    if state.messages == 0:
        return []
    msgs = await read_stream(js, names.replies_stream, state.last_seq)
    return [(m.subject.split(".", 2)[2], m.data.decode()) for m in msgs]
