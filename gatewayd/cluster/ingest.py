"""One owned partition's consumer: device messages in stream order, acked after commit.

Each partition is read through a durable pull consumer named after the owner's epoch
(`p<partition>-e<epoch>`). A new owner creates its consumer at the previous consumers' ack
floor and deletes theirs, so an earlier owner's late acknowledgements go nowhere. Messages
above the floor that an earlier owner had applied come back and are recognised as duplicates
by the agent's own dedup row (the JetStream stream sequence, `DedupKey`, recorded in the same
commit that the changelog carries), then acknowledged: exactly once per agent state.

A message is acknowledged only after the turn that consumed it committed (which, in cluster
mode, means its changes are in the partition's changelog) and only while this member still
holds the partition. Failures:

- the turn's own error (the handler raised) or a link the agent refused: the message is
  terminated (it would fail again) and logged, like the MQTT bridge's dead letters;
- everything else (commit refused because the partition was lost or fenced, storage failed,
  backpressure that aborted a batch): the partition is *poisoned*: nothing more is submitted
  or acknowledged, and the member gives it up and takes it again from the changelog, so no
  later message of an agent is applied after an earlier one failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from gatewayd.agents.errors import (
    AgentQuarantinedError,
    CommitError,
    SequenceGapError,
    StorageError,
)
from gatewayd.cluster.naming import Names
from protocols.link import Backpressure, DedupKey, LinkIdentity, LinkRejected, Outcome, Route

logger = logging.getLogger(__name__)

DEDUP_STREAM = "jetstream"  # the agents' dedup stream name for JetStream sequences
_CHECK_AFTER_IDLE_FETCHES = 5  # one-second fetches that found nothing
_POISON = (CommitError, StorageError, AgentQuarantinedError, SequenceGapError, Backpressure)


class ClusterLink(LinkIdentity):
    """The link of one agent's device messages on this member; `send` publishes to
    `<reply_subject>.<agent id>` (core NATS, at most once: live outputs)."""

    TRANSPORT = "nats"
    __slots__ = ("_nc", "_reply_subject", "closed")

    def __init__(self, nc: NatsClient, route: Route, reply_subject: str) -> None:
        super().__init__(f"nats:{route.agent_class}:{route.agent_id}", route, reply_subject)
        self._nc = nc
        self._reply_subject = reply_subject
        self.closed = False

    def send(self, data: bytes | str) -> None:
        if self.closed:
            return
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        task = asyncio.get_running_loop().create_task(
            self._nc.publish(self._reply_subject, payload)
        )
        task.add_done_callback(_log_failure)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = True


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("cluster: a reply could not be published: %s", task.exception())


async def open_consumer(js: JetStreamContext, names: Names, partition: int, epoch: int, *,
                        log_floor: int, max_ack_pending: int, replicas: int) -> tuple[str, int]:  # fmt: skip
    """Create this epoch's consumer of `partition` after the ingest floor (the changelog's, or
    a surviving earlier consumer's ack floor if higher) and delete the earlier consumers.
    Returns its name and the floor it starts after.

    The consumer has one replica: creating a replicated consumer forms a Raft group (half a
    second and more), which would add to every failover. Losing it with its NATS node loses
    nothing: the floor is in the replicated changelog, and the owner takes the partition
    again with a new consumer."""
    floor = log_floor
    older: list[str] = []
    for info in await js.consumers_info(names.ingest_stream):
        parsed = Names.consumer_partition_epoch(info.name)
        if parsed is None or parsed[0] != partition or parsed[1] >= epoch:
            continue
        older.append(info.name)
        acked = info.ack_floor.stream_seq if info.ack_floor else 0
        floor = max(floor, acked or 0)

    def config(name: str, replicas: int) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=name,
            filter_subject=names.ingest_filter(partition),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if floor else DeliverPolicy.ALL,
            opt_start_seq=floor + 1 if floor else None,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=60.0,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,
            num_replicas=replicas,
        )

    name = names.consumer(partition, epoch)
    try:
        await js.add_consumer(names.ingest_stream, config(name, 1), timeout=2.0)
    except (TimeoutError, NatsTimeoutError):
        # Its one replica was placed on a NATS node that is down: a replicated consumer
        # (slower to create) works as long as the stream has a quorum.
        logger.warning(
            "cluster: partition %d: consumer %s not created (a NATS node down?); creating a "
            "replicated one",
            partition,
            name,
        )
        older.append(name)
        name = names.consumer(partition, epoch, replicated=True)
        await js.add_consumer(names.ingest_stream, config(name, replicas), timeout=10.0)
    for old in older:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(names.ingest_stream, old)
    return name, floor


class IngestWorker:
    """Feeds one partition's messages to the agent runtime and acks them after commit."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        names: Names,
        runtime: Any,
        *,
        partition: int,
        consumer: str,
        floor: int,
        agent_class: str,
        reply_subject: str,
        fetch_batch: int,
        may_ack: Callable[[], bool],
        poisoned: Callable[[str], None],
        touched: Callable[[tuple[str, str]], None],
    ) -> None:
        self._nc = nc
        self._js = js
        self._names = names
        self._runtime = runtime
        self.partition = partition
        self._consumer = consumer
        self._agent_class = agent_class
        self._reply_subject = reply_subject
        self._fetch_batch = fetch_batch
        self._may_ack = may_ack
        self._poisoned = poisoned
        self._touched = touched
        self.links: dict[str, ClusterLink] = {}
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._to_ack: list[Msg] = []
        self._ack_wanted = asyncio.Event()
        self._stopping = False
        self.poison: str | None = None
        self.applied = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.last_acked_seq = 0
        # Ingest floor: every message up to it is settled (applied, duplicate or dead-lettered).
        self.floor = floor
        self._delivered: collections.deque[int] = collections.deque()
        self._settled_seqs: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._fetch_forever(), name=f"cluster ingest p{self.partition}"),
            loop.create_task(self._ack_forever(), name=f"cluster acks p{self.partition}"),
        ]

    async def stop(self, *, graceful: bool, timeout_s: float = 10.0) -> None:
        """Stop fetching; graceful: wait for the messages in flight and ack them first."""
        self._stopping = True
        fetcher, acker = self._tasks or (None, None)
        if fetcher is not None:
            fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetcher
        if graceful and self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        if acker is not None:
            if graceful:
                self._ack_wanted.set()
                await asyncio.sleep(0)
                await self._flush_acks()
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acker
        for link in self.links.values():
            link.closed = True

    # -- fetching and submitting --------------------------------------------------------------

    async def _fetch_forever(self) -> None:
        sub = await self._js.pull_subscribe_bind(
            durable=self._consumer, stream=self._names.ingest_stream
        )
        idle = 0
        try:
            while not self._stopping and self.poison is None:
                room = self._fetch_batch * 2 - len(self._in_flight)
                if room <= 0:
                    await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(min(room, self._fetch_batch), timeout=1.0)
                except TimeoutError:
                    idle += 1
                    if idle % _CHECK_AFTER_IDLE_FETCHES == 0:
                        # Quiet, or is its consumer gone with a NATS node? Ask.
                        await self._js.consumer_info(self._names.ingest_stream, self._consumer)
                    continue
                except NotFoundError:
                    self._poison("its consumer was deleted (another member took the partition)")
                    return
                idle = 0
                for msg in msgs:
                    if self._stopping or self.poison is not None:
                        return  # not acked: delivered again to whoever consumes next
                    await self._submit(msg)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._poison(f"fetching failed ({type(err).__name__}: {err})")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _submit(self, msg: Msg) -> None:
        parsed = self._names.agent_of(msg.subject)
        if parsed is None or parsed[0] != self.partition:
            logger.error(
                "cluster: partition %d: message on %r is not <ingest>.%d.<agent id>...; "
                "terminated (check the NATS subject mapping's partition count)",
                self.partition,
                msg.subject,
                self.partition,
            )
            await msg.term()
            return
        agent_id = parsed[1]
        seq = msg.metadata.sequence.stream
        if seq <= self.floor:
            await msg.ack()  # settled before (a redelivery below the floor)
            return
        self._delivered.append(seq)
        dedup = DedupKey(DEDUP_STREAM, seq, resume_seq=seq)
        link = self.links.get(agent_id)
        while True:
            try:
                if link is None:
                    link = ClusterLink(
                        self._nc,
                        Route(self._agent_class, agent_id),
                        f"{self._reply_subject}.{agent_id}",
                    )
                    opened = self._runtime.open_link(link, {"subject": msg.subject})
                    if _held_back(opened):
                        await _wait_ready(opened)
                        link = None
                        continue
                    opened.add_done_callback(_consume)
                    self.links[agent_id] = link
                    self._touched((self._agent_class, agent_id))
                future = self._runtime.submit_message(link, msg.data, dedup)
            except Backpressure as held:  # a full disk: nothing queued
                await held.ready
                continue
            if _held_back(future):
                await _wait_ready(future)
                continue
            break
        self._in_flight.add(future)
        future.add_done_callback(functools.partial(self._settled, msg))

    def _settled(self, msg: Msg, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(future)
        if future.cancelled():
            self._poison("a message's turn was cancelled")
            return
        err = future.exception()
        if err is None:
            if future.result() is Outcome.DUPLICATE:
                self.duplicates += 1
            else:
                self.applied += 1
            self._settle(msg)
            self._ack(msg)
        elif isinstance(err, _POISON) or (isinstance(err, LinkRejected) and err.code == 1001):
            self._poison(f"{type(err).__name__}: {err}")
        else:
            self.dead_lettered += 1
            logger.warning(
                "cluster: partition %d: message %d on %s failed (%s: %s); terminated",
                self.partition,
                msg.metadata.sequence.stream,
                msg.subject,
                type(err).__name__,
                err,
            )
            if self.poison is None and self._may_ack():
                self._settle(msg)
                asyncio.get_running_loop().create_task(msg.term()).add_done_callback(_log_failure)

    def _settle(self, msg: Msg) -> None:
        """Advance the floor over the messages settled in delivery (= stream) order."""
        self._settled_seqs.add(msg.metadata.sequence.stream)
        delivered, settled = self._delivered, self._settled_seqs
        while delivered and delivered[0] in settled:
            seq = delivered.popleft()
            settled.discard(seq)
            self.floor = seq

    def _poison(self, why: str) -> None:
        if self.poison is None:
            self.poison = why
            self._stopping = True
            self._poisoned(why)

    # -- acknowledgements ---------------------------------------------------------------------

    def _ack(self, msg: Msg) -> None:
        self._to_ack.append(msg)
        self._ack_wanted.set()

    async def _ack_forever(self) -> None:
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        msgs, self._to_ack = self._to_ack, []
        if not msgs or not self._may_ack():
            return  # the partition was lost: the next owner gets these again (duplicates)
        for msg in msgs:
            try:
                await msg.ack()
            except Exception as err:
                logger.warning("cluster: partition %d: ack failed: %s", self.partition, err)
                continue
            self.last_acked_seq = max(self.last_acked_seq, msg.metadata.sequence.stream)


def _held_back(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and isinstance(future.exception(), Backpressure)


async def _wait_ready(future: asyncio.Future[Any]) -> None:
    held = future.exception()
    assert isinstance(held, Backpressure)
    await held.ready


def _consume(future: asyncio.Future[Any]) -> None:
    """Connect outcomes are reported through the messages that follow; read it once."""
    if not future.cancelled():
        future.exception()
