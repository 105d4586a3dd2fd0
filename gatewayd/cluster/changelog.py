"""One partition's changelog: fenced appends, the snapshot in the object store, restore.

The log of partition p is the subject `gw.<group>.log.<p>` of the group's replicated log
stream. Every append carries `Nats-Expected-Last-Subject-Sequence` = the last sequence this
owner knows of that subject, so JetStream accepts it only while nobody else appended since:
a new owner first appends a *marker* (its epoch) after reading the log, and from then on every
append of an earlier owner fails ("wrong last sequence") however long it was paused. That is
the fencing: an owner that lost its partition cannot make a commit durable, so it cannot
acknowledge the messages the commit consumed either.

Appends are grouped (one publish carries the changes of every commit batch that waited for the
previous publish), like the runtime's group commit: at most one publish per partition is in
flight, as the expected sequence requires.

Every `snapshot_every` appends the owner puts the partition's images (every agent's database)
in the object store with the log sequence they cover, and purges the log below it; a new owner
restores the snapshot and replays the log after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import cbor2
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from gatewayd.agents.retry import RetryPolicy, backoff_delay_s
from gatewayd.cluster.metrics import APPEND_SECONDS
from gatewayd.cluster.naming import Names
from gatewayd.cluster.pages import LogMessage, PageChange, apply

logger = logging.getLogger(__name__)

AgentKey = tuple[str, str]
_WRONG_LAST_SEQUENCE = 10071
_PUBLISH_TIMEOUT_S = 2.0
_RETRY_FOR_S = 20.0  # past a leader election (~8 s measured); then the append fails
_APPEND_RETRY = RetryPolicy(base_delay_s=0.05, max_delay_s=0.25)
_READ_BATCH = 256
_REPLAY_CREATE_TIMEOUT_S = 1.0
_REPLAY_FETCH_TIMEOUT_S = 2.0


class ChangelogError(Exception):
    """An append did not become durable; the partition's commits must stop."""


class FencedError(ChangelogError):
    """Another member appended to this partition's log: this member no longer owns it."""


@dataclass(slots=True)
class RestoreReport:
    images: dict[AgentKey, bytes]
    floor: int
    snapshot_seq: int
    replayed: int
    last_seq: int
    seconds: float


class PartitionLog:
    """The changelog of one partition as its owner (`epoch`) writes it."""

    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        partition: int,
        epoch: int,
        member: str,
        *,
        max_payload: int,
    ) -> None:
        self._js = js
        self._names = names
        self.partition = partition
        self.epoch = epoch
        self.member = member
        self.subject = names.log_subject(partition)
        self.last_seq = 0
        self.appends = 0  # publishes since the last snapshot
        self._max_payload = max(4096, max_payload - 4096)
        # Every agent's image as the log holds it (restored, then updated by each append).
        self.images: dict[AgentKey, bytes] = {}
        self._queue: list[tuple[PageChange, bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.failed: ChangelogError | None = None
        # The ingest floor each append records (see pages.LogMessage): the restored one until
        # the partition's consumer reports its own.
        self.floor = 0
        self.floor_source: Callable[[], int] | None = None
        self.append_seconds = 0.0
        self.append_count = 0

    # -- restore ------------------------------------------------------------------------------

    async def restore(self, snapshots: ObjectStore) -> RestoreReport:
        """Read the snapshot and the log after it: every agent's image as the log holds it."""
        started = time.perf_counter()
        images: dict[AgentKey, bytes] = {}
        snapshot_seq = 0
        try:
            found = await snapshots.get(self._names.snapshot_name(self.partition))
        except (ObjectNotFoundError, NotFoundError):
            found = None
        if found is not None and found.data:
            raw = cbor2.loads(found.data)
            snapshot_seq = int(raw["seq"])
            self.floor = max(self.floor, int(raw.get("floor", 0)))
            for agent_class, agent_id, image in raw["agents"]:
                images[(agent_class, agent_id)] = image
        last = await self._last_subject_seq()
        replayed = 0
        if last > snapshot_seq:
            replayed = await self._replay(images, snapshot_seq + 1, last)
        self.last_seq = max(last, snapshot_seq)
        self.images = images
        return RestoreReport(
            images, self.floor, snapshot_seq, replayed, self.last_seq, time.perf_counter() - started
        )

    async def _last_subject_seq(self) -> int:
        try:
            msg = await self._js.get_last_msg(self._names.log_stream, self.subject)
        except NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def _replay(self, images: dict[AgentKey, bytes], start: int, last: int) -> int:
        try:
            return await self._replay_by_consumer(images, start, last)
        except (TimeoutError, NatsTimeoutError):
            # The consumer's single replica went to a NATS node that is down: read message by
            # message from the stream's leader instead (slower, needs no consumer).
            logger.warning(
                "cluster: partition %d: no replay consumer (a NATS node down?); reading the "
                "log message by message",
                self.partition,
            )
            return await self._replay_by_get(images, start, last)

    async def _replay_by_get(self, images: dict[AgentKey, bytes], start: int, last: int) -> int:
        replayed = 0
        seq = start
        while seq <= last:
            msg = await self._js.get_msg(
                self._names.log_stream, seq=seq, subject=self.subject, next=True
            )
            self._apply(images, msg.data or b"")
            replayed += 1
            seq = int(msg.seq or last) + 1
        return replayed

    def _apply(self, images: dict[AgentKey, bytes], data: bytes) -> None:
        message = LogMessage.decode(data)
        self.floor = max(self.floor, message.floor)
        for change in message.changes:
            key = (change.agent_class, change.agent_id)
            images[key] = apply(images.get(key, b""), change)

    async def _replay_by_consumer(
        self, images: dict[AgentKey, bytes], start: int, last: int
    ) -> int:
        # One replica in memory, created with a short timeout: one placed on a NATS node
        # that is down fails fast, and the caller reads message by message instead.
        info = await self._js.add_consumer(
            self._names.log_stream,
            ConsumerConfig(
                filter_subject=self.subject,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=10.0,
                mem_storage=True,
                num_replicas=1,
            ),
            timeout=_REPLAY_CREATE_TIMEOUT_S,
        )
        sub = await self._js.pull_subscribe_bind(info.name, stream=self._names.log_stream)
        replayed = 0
        try:
            seq = start - 1
            delivered = 0
            while seq < last:
                for msg in await sub.fetch(_READ_BATCH, timeout=_REPLAY_FETCH_TIMEOUT_S):
                    delivered += 1
                    if msg.metadata.sequence.consumer != delivered:
                        # A delivery lost on the way (no acks, so never sent again): read
                        # message by message instead (replaying pages again is idempotent).
                        raise TimeoutError(f"replay delivery {delivered} lost")
                    seq = msg.metadata.sequence.stream
                    self._apply(images, msg.data)
                    replayed += 1
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the ephemeral consumer goes away by itself
                logger.debug("cluster: could not unsubscribe a replay consumer", exc_info=True)
        return replayed

    # -- appends ---------------------------------------------------------------------------

    async def mark(self) -> None:
        """Append this owner's marker: every later append of an earlier owner fails."""
        await self._publish(self._message([]))

    async def append(self, change: PageChange, image: bytes) -> None:
        """Returns once `change` (making the agent's image `image`) is durable in the log
        (replicated); raises ChangelogError."""
        if self.failed is not None:
            raise self.failed
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((change, image, future))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                group: list[tuple[PageChange, bytes, asyncio.Future[None]]] = []
                size = 0
                while self._queue and (
                    not group or size + self._queue[0][0].size <= self._max_payload
                ):
                    item = self._queue.pop(0)
                    group.append(item)
                    size += item[0].size
                try:
                    if self.failed is not None:
                        raise self.failed
                    if size > self._max_payload:
                        raise ChangelogError(
                            f"one commit changed {size} bytes of pages, more than a changelog "
                            f"message may carry ({self._max_payload} bytes: raise NATS's "
                            "max_payload)"
                        )
                    changes = [change for change, _, _ in group]
                    await self._publish(self._message(changes))
                except ChangelogError as err:
                    if not isinstance(err, FencedError) or self.failed is None:
                        self.failed = self.failed or err
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(err)
                    continue
                self.appends += 1
                for change, image, future in group:
                    self.images[(change.agent_class, change.agent_id)] = image
                    if not future.done():
                        future.set_result(None)
        finally:
            self._flushing = None

    def _message(self, changes: list[PageChange]) -> bytes:
        if self.floor_source is not None:
            self.floor = max(self.floor, self.floor_source())
        return LogMessage(self.epoch, self.member, self.floor, changes).encode()

    async def _publish(self, payload: bytes) -> None:
        started = time.perf_counter()
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(self.last_seq),
            # A retry of a publish that did land is recognised (JetStream's duplicate window)
            # and answered with the first one's acknowledgement.
            "Nats-Msg-Id": f"{self.subject}/{self.epoch}/{self.last_seq}",
        }
        deadline = time.monotonic() + _RETRY_FOR_S
        retried = 0
        try:
            while True:
                try:
                    ack = await self._js.publish(
                        self.subject,
                        payload,
                        timeout=_PUBLISH_TIMEOUT_S,
                        stream=self._names.log_stream,
                        headers=headers,
                    )
                    seq = int(ack.seq)
                    break
                except (NoStreamResponseError, NatsTimeoutError, ConnectionClosedError,
                        NoRespondersError) as err:  # fmt: skip
                    # A NATS node went away (the client reconnects) or the stream is electing
                    # a leader (answered at once: no responders): the same message again, on a
                    # short jittered schedule, for a while.
                    if time.monotonic() > deadline:
                        raise
                    if not retried:
                        logger.info(
                            "cluster: partition %d: append not answered (%s); retrying",
                            self.partition, f"{type(err).__name__}: {err}",
                        )  # fmt: skip
                    retried += 1
                    await asyncio.sleep(backoff_delay_s(retried, _APPEND_RETRY))
        except APIError as err:
            landed = await self._landed(payload) if retried else None
            if landed is not None:
                # The first try did land (its acknowledgement was lost with a NATS node) and
                # the new leader checked the expected sequence before the message id.
                seq = landed
            elif err.err_code == _WRONG_LAST_SEQUENCE:
                self.failed = FencedError(
                    f"partition {self.partition}: another member appended to the changelog "
                    f"(epoch {self.epoch} is fenced off): {err.description}"
                )
                raise self.failed from None
            else:
                self.failed = ChangelogError(f"partition {self.partition}: append failed: {err}")
                raise self.failed from err
        except Exception as err:
            self.failed = ChangelogError(
                f"partition {self.partition}: append failed ({type(err).__name__}: {err})"
            )
            raise self.failed from err
        if retried:
            logger.info(
                "cluster: partition %d: append landed after %.2fs and %d retries (seq %d)",
                self.partition, time.perf_counter() - started, retried, seq,
            )  # fmt: skip
        self.last_seq = seq
        APPEND_SECONDS.observe(time.perf_counter() - started)
        self.append_seconds += time.perf_counter() - started
        self.append_count += 1

    async def _landed(self, payload: bytes) -> int | None:
        """The log's last message is `payload` right after `last_seq`: its sequence."""
        try:
            msg = await self._js.get_last_msg(self._names.log_stream, self.subject)
        except Exception:
            return None
        seq = int(msg.seq or 0)
        return seq if seq > self.last_seq and msg.data == payload else None

    # -- snapshots -------------------------------------------------------------------------

    def snapshot_due(self, every: int) -> bool:
        return self.appends >= every and self.failed is None

    async def snapshot(self, snapshots: ObjectStore) -> int:
        """Put every image (as of `last_seq`) in the object store; purge the log below it."""
        self.appends = 0
        seq = self.last_seq
        current = dict(self.images)  # taken now: consistent with `seq` (no await between)
        data = cbor2.dumps(
            {
                "seq": seq,
                "floor": self.floor,
                "agents": [[k[0], k[1], image] for k, image in current.items()],
            }
        )
        await snapshots.put(self._names.snapshot_name(self.partition), data)
        # Keep the last message: the expected-sequence check needs the subject's last seq.
        await self._js.purge_stream(self._names.log_stream, subject=self.subject, seq=seq)
        return len(data)
