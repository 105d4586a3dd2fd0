"""One owned partition's consumer: device messages in stream order, progress in the changelog.

Each partition is read through an *ordered pull consumer* of the replicated ingest stream:
one replica, in memory, no acknowledgements, starting at the next stream sequence this owner
needs (`p<partition>-e<epoch>-<n>`). It holds no state worth keeping, so when it stops
answering (its NATS node died: a fetch gets no reply, not even the idle heartbeats it asked
for), skips a delivery, or stays idle while the stream's leader holds more for the partition
(a lagging replica), the worker switches to a standby consumer kept on another node (unless
a consumer there stopped answering lately), or creates another one at its own position, under
a new name (the old name may be placed on the dead node again), hedging a create that is not
answered at once with another, and goes on. A NATS node's loss costs a fetch timeout, not a
takeover.

What a message acknowledgement used to say is in the partition's changelog: every append
records the *ingest floor* (every message up to it settled: applied, duplicate or
dead-lettered), and a message's turn commits only once its changes are in the replicated
log. A new owner starts after that floor; messages above it that an earlier owner had
applied come back and are recognised as duplicates by the agent's own dedup row (the
JetStream stream sequence, `DedupKey`, recorded in the same commit that the changelog
carries): exactly once per agent state. An earlier owner's consumer can deliver to it but
can make nothing durable: its appends are fenced (changelog.py).

Failures:

- the turn's own error (the handler raised) or a link the agent refused: the message is
  settled as dead-lettered (it would fail again) and logged, like the MQTT bridge's dead
  letters;
- everything else (commit refused because the partition was lost or fenced, storage failed,
  backpressure that aborted a batch): the partition is *poisoned*: nothing more is submitted,
  and the member gives it up and takes it again from the changelog, so no later message of
  an agent is applied after an earlier one failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, FetchTimeoutError, NotFoundError

from gatewayd.agents.errors import (
    AgentQuarantinedError,
    CommitError,
    SequenceGapError,
    StorageError,
)
from gatewayd.agents.retry import RetryPolicy, backoff_delay_s
from gatewayd.cluster.naming import Names
from gatewayd.cluster.outputs import JetStreamOutputs
from protocols.link import (
    Backpressure,
    DedupKey,
    LinkIdentity,
    LinkRejected,
    Outcome,
    OutputAddress,
    Route,
)

logger = logging.getLogger(__name__)

DEDUP_STREAM = "jetstream"  # the agents' dedup stream name for JetStream sequences
# A fetch asks for idle heartbeats: a live consumer answers within _FETCH_HEARTBEAT_S even
# when there is nothing to deliver, so a fetch with no answer at all means a dead consumer.
_FETCH_TIMEOUT_S = 1.0
_FETCH_HEARTBEAT_S = 0.25
_CREATE_TIMEOUT_S = 1.0
# A create not answered by then is hedged with another (a new name) in parallel: while a NATS
# node is down, JetStream places about one create in three on it and never answers those.
_HEDGE_AFTER_S = 0.25
_CREATES_IN_FLIGHT = 3
_CREATE_RETRY = RetryPolicy(base_delay_s=0.05, max_delay_s=0.5)  # after failed answers
_SUSPECT_FOR_S = 15.0  # a node whose consumer did not answer: no standby there meanwhile
# The probe asks the stream's leader, which may be being elected (no answer): it waits 0.5 s,
# twice that after each probe not answered, up to 2 s (a loaded leader may be slow).
_PROBE_TIMEOUT_S = (0.5, 2.0)
_INACTIVE_THRESHOLD_S = 30.0
_REFUSALS_BEFORE_REPLACING = 20
_STANDBY_REFRESH_S = 10.0
_STANDBY_CHECK_S = 0.5
_NO_ANSWER = "did not answer (its NATS node down?)"
_STALLED = "delivers nothing while the stream has more for it (a lagging replica?)"
_PROBE_AFTER_IDLE = 3  # idle fetches (about a second each) before asking the stream
# ... and after each while a node is suspect: after a leader election, a replica may lag
_POISON = (CommitError, StorageError, AgentQuarantinedError, SequenceGapError, Backpressure)


class ClusterLink(LinkIdentity):
    """The link of one agent's device messages on this member, with live outputs: `send`
    publishes to `<reply_subject>.<agent id>` on core NATS after the commit (at most once;
    `[cluster] durable_replies = false`)."""

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


class DurableClusterLink(ClusterLink):
    """A `ClusterLink` whose outputs are durable (the default): outbox rows of the turn's
    commit, sent through JetStream by `outputs` (see outputs.py)."""

    __slots__ = ("_outputs",)

    def __init__(
        self, nc: NatsClient, route: Route, reply_subject: str, outputs: JetStreamOutputs
    ) -> None:
        super().__init__(nc, route, reply_subject)
        self._outputs = outputs

    @property
    def output_address(self) -> OutputAddress:
        return JetStreamOutputs.address(self._reply_subject)

    @property
    def outputs(self) -> JetStreamOutputs:
        return self._outputs


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("cluster: a reply could not be published: %s", task.exception())


async def delete_older_consumers(
    js: JetStreamContext, names: Names, partition: int, epoch: int
) -> None:
    """Housekeeping after a take: delete earlier owners' consumers of `partition` (they hold
    nothing: no acks; one on a NATS node that is down goes by itself when inactive)."""
    try:
        infos = await js.consumers_info(names.ingest_stream)
    except Exception as err:
        logger.debug("cluster: partition %d: consumers not listed: %s", partition, err)
        return
    for info in infos:
        parsed = Names.consumer_partition_epoch(info.name)
        if parsed is not None and parsed[0] == partition and parsed[1] < epoch:
            with contextlib.suppress(Exception):
                await js.delete_consumer(names.ingest_stream, info.name)


class SuspectNodes:
    """NATS nodes on which a consumer stopped answering lately (shared by a member's workers:
    one dead node shows in each of them). A standby there is not switched to but replaced;
    a consumer created there since proves the node is back."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def mark(self, node: str) -> None:
        if node:
            self._since[node] = time.monotonic()

    def clear(self, node: str) -> None:
        self._since.pop(node, None)

    def suspect(self, node: str) -> bool:
        since = self._since.get(node)
        return since is not None and time.monotonic() - since < _SUSPECT_FOR_S

    def any(self) -> bool:
        return any(self.suspect(node) for node in self._since)


_SUSPECTS = SuspectNodes()  # this process's view (one member per process)


class IngestWorker:
    """Feeds one partition's messages to the agent runtime, in stream order, through an
    ordered pull consumer it recreates from its own position whenever it stops answering."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        names: Names,
        runtime: Any,
        *,
        partition: int,
        epoch: int,
        floor: int,
        agent_class: str,
        reply_subject: str,
        outputs: JetStreamOutputs | None,
        fetch_batch: int,
        poisoned: Callable[[str], None],
        touched: Callable[[tuple[str, str]], None],
        suspects: SuspectNodes = _SUSPECTS,
    ) -> None:
        self._nc = nc
        self._suspects = suspects
        self._js = js
        self._names = names
        self._runtime = runtime
        self.partition = partition
        self.epoch = epoch
        self._agent_class = agent_class
        self._reply_subject = reply_subject
        self._outputs = outputs
        self._fetch_batch = fetch_batch
        self._poisoned = poisoned
        self._touched = touched
        self.links: dict[str, ClusterLink] = {}
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._stopping = False
        self.poison: str | None = None
        self.applied = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.consumers_opened = 0
        # Ingest floor: every message up to it is settled (applied, duplicate or dead-lettered).
        self.floor = floor
        # The next stream sequence to submit: a recreated consumer starts there.
        self.next_seq = floor + 1
        self.consumer = ""
        self._consumer_node = ""
        # (name, node, created at, start seq) of the consumer kept ready on another node.
        self._standby: tuple[str, str, float, int] | None = None
        self.standby_switches = 0
        self.fetches = collections.Counter[str]()
        self._probe_timeout_s = _PROBE_TIMEOUT_S[0]
        self._generation = 0
        self._delivered: collections.deque[int] = collections.deque()
        self._settled_seqs: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._cleanup: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Create the first consumer (retrying while a NATS node is down or JetStream elects
        a leader), so the partition is served once this returns."""
        created = await self._create(self.next_seq)
        if created is not None:
            self.consumer, self._consumer_node = created

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._fetch_forever(), name=f"cluster ingest p{self.partition}"),
            loop.create_task(self._keep_standby(), name=f"cluster standby p{self.partition}"),
        ]

    async def stop(self, *, graceful: bool, timeout_s: float = 10.0) -> None:
        """Stop fetching; graceful: wait for the messages in flight to settle first."""
        logger.info(
            "cluster: partition %d: stopping its consumer %s at stream seq %d (floor %d, %d "
            "in flight, %d consumers opened, %d standby switches, fetches %s)",
            self.partition, self.consumer, self.next_seq, self.floor, len(self._in_flight),
            self.consumers_opened, self.standby_switches, dict(self.fetches),
        )  # fmt: skip
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if graceful and self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        for link in self.links.values():
            link.closed = True
        for name in (self.consumer, self._standby[0] if self._standby else ""):
            if name:
                self._delete_later(name)

    # -- the consumers -----------------------------------------------------------------------

    async def _create(self, start_seq: int) -> tuple[str, str] | None:
        """A fresh consumer starting at `start_seq`: `(name, NATS node)`, or None once
        stopping. Each try has a fresh name (a create that timed out may have been placed on
        a NATS node that is down, and the same name would land there again), and a try not
        answered within `_HEDGE_AFTER_S` is joined by another: the first created wins, the
        others are deleted."""
        started, failures = time.monotonic(), 0
        pending: dict[asyncio.Task[Any], str] = {}
        next_try = started  # at most one try per _HEDGE_AFTER_S, later after failed answers
        try:
            while not self._stopping:
                if len(pending) < _CREATES_IN_FLIGHT and time.monotonic() >= next_try:
                    name = self._names.consumer(self.partition, self.epoch, self._generation)
                    self._generation += 1
                    pending[asyncio.ensure_future(self._add_consumer(name, start_seq))] = name
                    next_try = time.monotonic() + _HEDGE_AFTER_S
                wait_s = max(0.01, next_try - time.monotonic())
                if not pending:
                    await asyncio.sleep(wait_s)
                    continue
                done, _ = await asyncio.wait(
                    set(pending), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    name = pending.pop(task)
                    try:
                        info = task.result()
                    except (TimeoutError, NatsTimeoutError, NoRespondersError,
                            ConnectionClosedError, APIError) as err:  # fmt: skip
                        failures += 1
                        next_try = max(
                            next_try,
                            time.monotonic() + backoff_delay_s(min(failures, 20), _CREATE_RETRY),
                        )
                        logger.debug(
                            "cluster: partition %d: consumer %s not created (%s)",
                            self.partition, name, f"{type(err).__name__}: {err}",
                        )  # fmt: skip
                        self._delete_later(name)
                        continue
                    self.consumers_opened += 1
                    node = (info.cluster.leader if info.cluster else None) or ""
                    self._suspects.clear(node)
                    if failures or time.monotonic() - started > _HEDGE_AFTER_S:
                        logger.info(
                            "cluster: partition %d: consumer %s created on %s at stream seq %d "
                            "after %.2fs (%d tries failed)",
                            self.partition, name, node or "?", start_seq,
                            time.monotonic() - started, failures,
                        )  # fmt: skip
                    return name, node
            return None
        finally:
            for task, name in pending.items():
                task.cancel()
                self._delete_later(name)

    async def _add_consumer(self, name: str, start_seq: int) -> Any:
        config = ConsumerConfig(
            name=name,
            filter_subject=self._names.ingest_filter(self.partition),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.NONE,
            num_replicas=1,
            mem_storage=True,
            inactive_threshold=_INACTIVE_THRESHOLD_S,
        )
        return await self._js.add_consumer(
            self._names.ingest_stream, config, timeout=_CREATE_TIMEOUT_S
        )

    async def _keep_standby(self) -> None:
        """Keep a second consumer on another NATS node, recreated near the current position
        every few seconds: when the serving one's node dies, the worker switches to it at
        once, with no create (which waits for the meta leader and may be placed on the dead
        node until JetStream notices it is gone)."""
        while not self._stopping:
            standby = self._standby
            fresh = standby is not None and (
                time.monotonic() - standby[2] < _STANDBY_REFRESH_S
                and self.next_seq - standby[3] < self._fetch_batch * 4
                and standby[1] != self._consumer_node
                and not self._suspects.suspect(standby[1])
            )
            if not fresh and self.consumer:
                start = self.next_seq
                created = await self._create(start)
                if created is None:
                    return
                if created[1] and created[1] == self._consumer_node:
                    self._delete_later(created[0])  # same node as the serving one
                else:
                    if self._standby is not None:
                        self._delete_later(self._standby[0])
                    self._standby = (created[0], created[1], time.monotonic(), start)
                    continue
            await asyncio.sleep(_STANDBY_CHECK_S)

    def _delete_later(self, name: str) -> None:
        """Delete a consumer in the background (it also goes by itself when inactive)."""

        async def delete() -> None:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self._names.ingest_stream, name)

        task = asyncio.get_running_loop().create_task(delete())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    # -- fetching and submitting --------------------------------------------------------------

    async def _fetch_forever(self) -> None:
        try:
            while not self._stopping and self.poison is None:
                if not self.consumer:
                    created = await self._create(self.next_seq)
                    if created is not None:
                        self.consumer, self._consumer_node = created
                    continue
                why = await self._consume(self.consumer)
                if why is None or self._stopping or self.poison is not None:
                    return
                self._delete_later(self.consumer)
                if why == _NO_ANSWER:
                    self._suspects.mark(self._consumer_node)
                standby = self._standby
                if (
                    standby is not None
                    and standby[1] != self._consumer_node
                    and not self._suspects.suspect(standby[1])
                ):
                    # The standby serves at once, with no create (which waits for the meta
                    # leader, and while a node is down may be placed on it).
                    self._standby = None
                    (logger.warning if why == _NO_ANSWER else logger.info)(
                        "cluster: partition %d: consumer %s (on %s) %s; switching to %s (on %s) "
                        "at stream seq %d",
                        self.partition, self.consumer, self._consumer_node or "?", why,
                        standby[0], standby[1] or "?", self.next_seq,
                    )  # fmt: skip
                    self.consumer, self._consumer_node = standby[0], standby[1]
                    self.standby_switches += 1
                    continue
                (logger.warning if why == _NO_ANSWER else logger.info)(
                    "cluster: partition %d: consumer %s %s; recreating it at stream seq %d",
                    self.partition, self.consumer, why, self.next_seq,
                )  # fmt: skip
                self.consumer = ""
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._poison(f"fetching failed ({type(err).__name__}: {err})")

    async def _consume(self, consumer: str) -> str | None:
        """Fetch from `consumer` until stopped (None) or until it must be replaced (why)."""
        sub = await self._js.pull_subscribe_bind(
            consumer=consumer, stream=self._names.ingest_stream
        )
        expected = 1  # the consumer's own delivery sequence: a gap = a delivery lost
        refused = idle = 0
        try:
            while not self._stopping and self.poison is None:
                room = self._fetch_batch * 2 - len(self._in_flight)
                if room <= 0:
                    await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    self.fetches["asked"] += 1
                    msgs = await sub.fetch(
                        min(room, self._fetch_batch),
                        timeout=_FETCH_TIMEOUT_S,
                        heartbeat=_FETCH_HEARTBEAT_S,
                    )
                except FetchTimeoutError:
                    self.fetches["idle"] += 1
                    refused = 0
                    idle += 1
                    if idle % self._probe_every() == 0 and await self._behind():
                        return _STALLED
                    continue  # it answered (heartbeats): nothing new
                except (TimeoutError, NatsTimeoutError):
                    return _NO_ANSWER
                except NotFoundError:
                    return "is gone"
                except APIError as err:
                    # It answered, e.g. "heartbeat value too large" when the client's
                    # remaining expiry got short: alive; ask again (a while, then replace it).
                    refused += 1
                    if refused > _REFUSALS_BEFORE_REPLACING:
                        return f"refused {refused} fetches ({err.description})"
                    continue
                refused = 0
                if not msgs:
                    idle += 1
                    if idle % self._probe_every() == 0 and await self._behind():
                        return _STALLED
                    continue
                idle = 0
                self.fetches["messages"] += len(msgs)
                for msg in msgs:
                    if self._stopping or self.poison is not None:
                        return None
                    delivered = msg.metadata.sequence.consumer
                    if delivered != expected:
                        return f"skipped deliveries ({expected} expected, {delivered} came)"
                    expected += 1
                    seq = msg.metadata.sequence.stream
                    if seq < self.next_seq:
                        self.fetches["skipped"] += 1
                        continue  # submitted before (through an earlier consumer)
                    await self._submit(msg)
                    self.next_seq = seq + 1
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return None

    def _probe_every(self) -> int:
        return 1 if self._suspects.any() else _PROBE_AFTER_IDLE

    async def _behind(self) -> bool:
        """Its consumer has been idle for a while: does the stream (its leader) hold a message
        of this partition at or after `next_seq`? Then the consumer is stuck (it reads a
        replica that lags, seen on a loaded machine for tens of seconds) and is replaced."""
        try:
            found = await asyncio.wait_for(
                self._js.get_msg(
                    self._names.ingest_stream,
                    seq=self.next_seq,
                    subject=self._names.ingest_filter(self.partition),
                    next=True,
                ),
                self._probe_timeout_s,
            )
        except NotFoundError:
            self._probe_timeout_s = _PROBE_TIMEOUT_S[0]
            return False
        except TimeoutError:
            self._probe_timeout_s = min(_PROBE_TIMEOUT_S[1], self._probe_timeout_s * 2)
            logger.debug("cluster: partition %d: probe not answered", self.partition)
            return False
        except Exception as err:
            logger.debug("cluster: partition %d: probe failed: %s", self.partition, err)
            return False
        self._probe_timeout_s = _PROBE_TIMEOUT_S[0]
        self.fetches["stalled"] += 1
        return int(found.seq or 0) >= self.next_seq

    async def _submit(self, msg: Msg) -> None:
        parsed = self._names.agent_of(msg.subject)
        if parsed is None or parsed[0] != self.partition:
            logger.error(
                "cluster: partition %d: message on %r is not <ingest>.%d.<agent id>...; "
                "skipped (check the NATS subject mapping's partition count)",
                self.partition,
                msg.subject,
                self.partition,
            )
            self.dead_lettered += 1
            return
        agent_id = parsed[1]
        seq = msg.metadata.sequence.stream
        if seq <= self.floor:
            return  # settled before
        self._delivered.append(seq)
        dedup = DedupKey(DEDUP_STREAM, seq, resume_seq=seq)
        link = self.links.get(agent_id)
        while True:
            try:
                if link is None:
                    route = Route(self._agent_class, agent_id)
                    subject = f"{self._reply_subject}.{agent_id}"
                    link = (
                        ClusterLink(self._nc, route, subject)
                        if self._outputs is None
                        else DurableClusterLink(self._nc, route, subject, self._outputs)
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
        elif isinstance(err, _POISON) or (isinstance(err, LinkRejected) and err.code == 1001):
            self._poison(f"{type(err).__name__}: {err}")
        else:
            self.dead_lettered += 1
            logger.warning(
                "cluster: partition %d: message %d on %s failed (%s: %s); dead-lettered",
                self.partition,
                msg.metadata.sequence.stream,
                msg.subject,
                type(err).__name__,
                err,
            )
            if self.poison is None:
                self._settle(msg)

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
