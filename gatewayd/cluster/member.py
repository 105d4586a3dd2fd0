"""One member of a group: connects to NATS, keeps its lease, takes and gives up partitions.

Every heartbeat the member renews its lease, then compares what it holds with what the group
wants: each partition's preferred owner among the live members (rendezvous hashing, so a
member joining or leaving moves only about P/N partitions). It takes a partition that should
be its own when the partition is unowned or its owner is dead (compare-and-set, epoch + 1),
and gives back, gracefully, one that should now be another's (a member joined): it stops
fetching, lets the turns in flight commit and acks them, hibernates the agents, clears the
owner and deletes the agents' local files (the log has them), and the preferred member takes
it on its next heartbeat.

Taking a partition: restore the agents' images from the snapshot and the changelog, write them
as the agents' SQLite files, append the epoch's marker to the changelog (fencing every earlier
owner), create this epoch's consumer at the ack floor, then serve. Losing one (fenced, lease
expired, a failure that poisoned it): stop at once, acknowledge nothing more, hibernate and
delete the local files (they may hold what the log does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.object_store import ObjectStore

from gatewayd.agents.storage import AgentDatabase, agent_db_file, stored_agent_id
from gatewayd.cluster import metrics
from gatewayd.cluster.changelog import PartitionLog
from gatewayd.cluster.credentials import CredentialsError, read_user_credentials
from gatewayd.cluster.ingest import IngestWorker, delete_older_consumers
from gatewayd.cluster.naming import Names, partition_of, preferred_owner
from gatewayd.cluster.outputs import JetStreamOutputs
from gatewayd.cluster.ownership import Ownership
from gatewayd.cluster.replicator import Replicator
from gatewayd.cluster.settings import ClusterSettings

logger = logging.getLogger(__name__)

AgentKey = tuple[str, str]
_TAKE_ATTEMPTS = 5
_SUBJECTS_OVERLAP = 10065  # JetStream's error code: subjects overlap with a stream
_NOT_ENABLED_FOR_ACCOUNT = 10039  # JetStream's error code: the account has no JetStream
FIRST_HEARTBEAT_S = 10.0  # how long `start` retries its first heartbeat
_FIRST_CONNECT_ROUNDS = 2
_FIRST_CONNECT_S = 15.0
_ENSURE_STREAMS_S = 20.0
_REPLY_DEDUP_WINDOW_S = 300.0
_REPLY_MAX_AGE_S = 3600.0


@dataclass(slots=True)
class OwnedPartition:
    number: int
    epoch: int
    log: PartitionLog
    state: str = "starting"  # starting -> serving -> releasing | lost
    worker: IngestWorker | None = None
    agents: set[AgentKey] = field(default_factory=set)
    taken_at: float = field(default_factory=time.monotonic)
    restore_s: float = 0.0
    restored_agents: int = 0
    replayed: int = 0


class ClusterMember:
    """Cluster mode for one gatewayd process (see the module docstring).

    `state_dir` holds the agents' files as a cache of the partitions this member owns; it is
    emptied at start (the group's changelog is the truth)."""

    def __init__(self, settings: ClusterSettings, runtime: Any, state_dir: Path) -> None:
        self.settings = settings
        self.runtime = runtime
        self.state_dir = state_dir
        self.name = settings.member_name
        self.names = Names(settings.group, settings.ingest_subject)
        self.partitions: dict[int, OwnedPartition] = {}
        self.replicator = Replicator(self)
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.ownership: Ownership | None = None
        self._snapshots: ObjectStore | None = None
        self.outputs: JetStreamOutputs | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._transitions: dict[int, asyncio.Task[None]] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        # A given-up partition's local files being deleted: a take of the same partition
        # waits for it before it writes the restored images (see _forget).
        self._deleting: dict[int, asyncio.Task[int]] = {}
        # Set while this member's lease is (known) valid: commits wait for it (see _resume).
        self._writable = asyncio.Event()
        self._writable.set()
        self._suspended_since: float | None = None
        self._stopping = False
        self._alive: set[str] = set()
        self._joined_at = time.monotonic()
        self.counters = {"taken": 0, "released": 0, "lost": 0, "snapshots": 0}
        # Called with a partition's number when this member stops serving it (given back or
        # lost): routing closes the clients connected here to its agents.
        self.partition_moving: list[Callable[[int], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def prepare_state_dir(state_dir: Path) -> None:
        """Before the agent runtime opens it: empty the member's cache (agent files, and the
        schedule and outbox indexes naming agents this member may no longer own)."""
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        """Connect, make sure the group's streams and buckets exist, start heartbeating."""
        agents_dir = self.state_dir / "agents"
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(shutil.rmtree, agents_dir, ignore_errors=True)
        )
        self.nc = await connect(self.settings, self.name)
        self.js = self.nc.jetstream(timeout=5.0)
        await self._ensure_streams()
        self._snapshots = await _object_store(self.js, self.names.snapshots_bucket, self.settings)
        self.ownership = Ownership(self.js, self.names, self.settings, self.name)
        await self.ownership.open()
        self.runtime.set_replicator(self.replicator)
        self.outputs = JetStreamOutputs(self.nc.jetstream(timeout=5.0))
        self.runtime.attach_outputs(self.outputs)
        # Right after its bucket is created, JetStream may not take the first write yet ("no
        # response from stream", a timeout; `heartbeat` logs why): retry with backoff a while.
        attempt, delay, give_up = 1, 0.25, time.monotonic() + FIRST_HEARTBEAT_S
        while not await self.ownership.heartbeat(sorted(self.partitions)):
            if time.monotonic() + delay > give_up:
                raise ConnectionError(
                    f"cluster: the first heartbeat was not confirmed by JetStream "
                    f"({attempt} attempts in {FIRST_HEARTBEAT_S:.0f}s)"
                )
            logger.warning(
                "cluster: first heartbeat not confirmed (attempt %d); retrying in %.2fs",
                attempt,
                delay,
            )
            await asyncio.sleep(delay)
            attempt, delay = attempt + 1, min(2 * delay, 2.0)
        self._joined_at = time.monotonic()
        self._loop_task = asyncio.get_running_loop().create_task(
            self._heartbeat_forever(), name="cluster heartbeat"
        )
        logger.info(
            "cluster: member %s joined group %s (%d partitions, lease %.1fs)",
            self.name,
            self.settings.group,
            self.settings.partitions,
            self.settings.lease_s,
        )

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Give every partition back gracefully, leave the group, close the connection."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for task in list(self._transitions.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(
            *(self._release(part, timeout_s) for part in list(self.partitions.values())),
            return_exceptions=True,
        )
        if self.outputs is not None:
            self.runtime.detach_outputs(self.outputs)
            await self.outputs.close()
        if self.ownership is not None:
            await self.ownership.close(leave=True)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        replicator = self.replicator
        logger.info(
            "cluster: member %s left group %s; changelog: %d commits, %d bytes, %.3f ms per "
            "commit (serialise, diff, replicated append)",
            self.name,
            self.settings.group,
            replicator.commits,
            replicator.bytes,
            1000 * replicator.seconds / max(1, replicator.commits),
        )

    async def _ensure_streams(self) -> None:
        assert self.js is not None
        replicas = self.settings.replicas
        configs = [
            StreamConfig(
                name=self.names.ingest_stream,
                subjects=[f"{self.settings.ingest_subject}.>"],
                num_replicas=replicas,
                storage=StorageType.FILE,
            ),
            StreamConfig(
                name=self.names.log_stream,
                subjects=[f"{self.names.log_prefix}.>"],
                num_replicas=replicas,
                storage=StorageType.FILE,
            ),
        ]
        if self.settings.durable_replies:
            # Device replies (outputs.py): JetStream drops a resend of a reply by message id
            # within the duplicate window; replies are kept for an hour.
            configs.append(
                StreamConfig(
                    name=self.names.replies_stream,
                    subjects=[f"{self.settings.reply_subject}.>"],
                    num_replicas=replicas,
                    storage=StorageType.FILE,
                    duplicate_window=_REPLY_DEDUP_WINDOW_S,
                    max_age=_REPLY_MAX_AGE_S,
                )
            )
        deadline = time.monotonic() + _ENSURE_STREAMS_S
        for config in configs:
            while True:
                try:
                    await self.js.stream_info(config.name or "")
                    break
                except Exception:
                    pass
                try:
                    await self.js.add_stream(config)
                    break
                except Exception as err:
                    if getattr(err, "err_code", None) == _SUBJECTS_OVERLAP:
                        # Another stream (e.g. another group's) captures these subjects:
                        # a configuration error, not worth retrying.
                        raise ConnectionError(
                            f"cluster: stream {config.name} cannot capture "
                            f"{', '.join(config.subjects or [])}: another stream on this NATS "
                            "cluster already does; give each group its own [cluster] "
                            "ingest_subject and reply_subject"
                        ) from err
                    if getattr(err, "err_code", None) == _NOT_ENABLED_FOR_ACCOUNT:
                        account = ""
                        if self.settings.credentials_file:
                            with contextlib.suppress(CredentialsError):
                                user = read_user_credentials(self.settings.credentials_file)
                                account = f" ({user.account}, of credentials_file {user.path})"
                        raise ConnectionError(
                            f"JetStream is not enabled for this member's NATS "
                            f"account{account}: enable it (operator mode: give the account "
                            "JetStream limits, e.g. nsc edit account --js-disk-storage -1 "
                            "--js-mem-storage -1)"
                        ) from err
                    # Created by another member meanwhile (found next round), or a NATS
                    # cluster that has just started and knows too few peers to place R3.
                    if time.monotonic() > deadline:
                        raise
                    logger.info("cluster: stream %s not created yet (%s)", config.name, err)
                    await asyncio.sleep(0.3)

    async def _resume(self) -> None:
        """A heartbeat was confirmed after the lease had expired: keep the partitions whose
        record (read from the bucket itself) still names this member at the same epoch: nobody
        took them, and nobody will before this new lease runs out; lose the others."""
        assert self.ownership is not None and self._suspended_since is not None
        for part in list(self.partitions.values()):
            if part.state == "lost":
                continue
            try:
                record = await self.ownership.refresh(part.number)
            except Exception as err:
                logger.info("cluster: %s: records not read yet (%s)", self.name, err)
                return  # try again after the next heartbeat
            if record is None or record.owner != self.name or record.epoch != part.epoch:
                self._lose(part, f"the partition record moved on while suspended ({record})")
        logger.info(
            "cluster: %s: lease confirmed again after %.1fs; serving %d partitions",
            self.name,
            time.monotonic() - self._suspended_since,
            sum(1 for p in self.partitions.values() if p.state != "lost"),
        )
        self._suspended_since = None
        self._writable.set()

    # -- what the replicator asks ------------------------------------------------------------

    async def wait_writable(self, agent_id: str) -> None:
        """While this member's lease is being confirmed again (after a JetStream election, a
        pause, a cut), a commit of a partition it holds waits, up to `lease_s * 2`, instead
        of failing: most such lapses end with the partitions still this member's."""
        if self._writable.is_set():
            if self.ownership is None or self.ownership.lease_valid():
                return
            self._suspend()  # the lease ran out before the heartbeat loop noticed
        number = partition_of(agent_id, self.settings.partitions)
        if number not in self.partitions:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._writable.wait(), self.settings.lease_s * 2)

    def writable_log(self, agent_id: str) -> tuple[PartitionLog | None, str]:
        number = partition_of(agent_id, self.settings.partitions)
        part = self.partitions.get(number)
        if part is None:
            return None, f"partition {number} is owned by another member"
        if part.state not in ("serving", "releasing"):
            return None, f"partition {number} is {part.state} on this member"
        assert self.ownership is not None
        if not self.ownership.lease_valid():
            return None, "this member's lease expired"
        if part.log.failed is not None:
            return None, f"partition {number}: {part.log.failed}"
        return part.log, ""

    def appended(self, log: PartitionLog, key: AgentKey) -> None:
        part = self.partitions.get(log.partition)
        if part is None or part.log is not log:
            return
        part.agents.add(key)
        if (
            log.snapshot_due(self.settings.snapshot_every)
            and log.partition not in self._transitions
        ):
            self._spawn(log.partition, self._snapshot(part))

    # -- the heartbeat loop ------------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        assert self.ownership is not None
        while not self._stopping:
            started = time.monotonic()
            confirmed = await self.ownership.heartbeat(sorted(self.partitions))
            if confirmed and self._suspended_since is not None:
                await self._resume()
            metrics.PARTITIONS_OWNED.set(len(self.partitions))
            metrics.LEASE_LEFT.set(max(0.0, self.ownership.lease_left_s()))
            try:
                self._balance()
            except Exception:
                logger.exception("cluster: balancing failed")
            delay = self.settings.heartbeat_s - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ownership.changed.wait(), max(0.01, delay))
            self.ownership.changed.clear()
            if time.monotonic() - started < self.settings.heartbeat_s:
                # A record changed: balance at once, but heartbeat only on schedule.
                with contextlib.suppress(Exception):
                    self._balance()
                rest = self.settings.heartbeat_s - (time.monotonic() - started)
                if rest > 0:
                    await asyncio.sleep(rest)

    def _suspend(self) -> None:
        """The lease expired: commits wait until a heartbeat is confirmed again (_resume)."""
        if self._suspended_since is None and self.partitions:
            logger.warning(
                "cluster: %s: its lease expired (paused, cut off, or JetStream electing a "
                "leader?): commits wait until a heartbeat is confirmed again",
                self.name,
            )
        if self._suspended_since is None:
            self._suspended_since = time.monotonic()
            self._writable.clear()

    def _balance(self) -> None:
        ownership = self.ownership
        assert ownership is not None
        if not ownership.lease_valid():
            self._suspend()
            return
        if self._suspended_since is not None:
            return  # confirmed again, not yet checked (_resume)
        alive = ownership.alive()
        watched_a_lease = time.monotonic() - self._joined_at >= self.settings.lease_s
        for gone in sorted(self._alive - set(alive)):
            logger.info("cluster: %s: member %s is silent past its lease", self.name, gone)
        for new in sorted(set(alive) - self._alive):
            logger.info("cluster: %s: member %s is alive", self.name, new)
        self._alive = set(alive)
        for number in range(self.settings.partitions):
            if number in self._transitions:
                continue
            record = ownership.records.get(number)
            held = self.partitions.get(number)
            wanted = preferred_owner(number, alive)
            if held is not None:
                if not ownership.holds(number, held.epoch):
                    self._lose(held, f"the partition record moved on ({record})")
                elif wanted != self.name and held.state == "serving":
                    self._spawn(number, self._release(held, 10.0))
                continue
            if wanted != self.name:
                continue
            if record is None or not record.owner or record.owner == self.name:
                logger.debug("cluster: %s: taking partition %d (%s)", self.name, number, record)
                self._spawn(number, self._take(number))
            elif record.owner not in alive and watched_a_lease:
                # (Until this member has watched for a whole lease, an owner it has not seen
                # heartbeat yet may well be alive.)
                logger.info(
                    "cluster: %s: taking partition %d from %s (silent; alive: %s)",
                    self.name, number, record.owner, ",".join(alive),
                )  # fmt: skip
                self._spawn(number, self._take(number))

    def _spawn(self, number: int, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"cluster p{number}")
        self._transitions[number] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._transitions.get(number) is finished:
                del self._transitions[number]
            if not finished.cancelled() and finished.exception() is not None:
                logger.error(
                    "cluster: partition %d: %s", number, finished.exception(),
                    exc_info=finished.exception(),
                )  # fmt: skip

        task.add_done_callback(done)

    def _spawn_cleanup(self, work: Any) -> None:
        """Background housekeeping nobody waits for (its failure is only logged)."""
        task = asyncio.get_running_loop().create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # -- taking a partition ------------------------------------------------------------------

    async def _take(self, number: int) -> None:
        assert self.ownership is not None and self.js is not None and self.nc is not None
        assert self._snapshots is not None and self.outputs is not None
        epoch = await self.ownership.take(number)
        if epoch is None:
            return
        log = PartitionLog(
            self.js, self.names, number, epoch, self.name, max_payload=self.nc.max_payload
        )
        part = OwnedPartition(number, epoch, log)
        self.partitions[number] = part
        try:
            for _attempt in range(_TAKE_ATTEMPTS):
                report = await log.restore(self._snapshots)
                await self._write_images(part, report.images)
                try:
                    await log.mark()
                except Exception:
                    if not self.ownership.holds(number, epoch):
                        raise
                    log.failed = None  # an earlier owner appended meanwhile: read again
                    continue
                break
            else:
                raise RuntimeError(f"the changelog kept changing during {_TAKE_ATTEMPTS} restores")
            part.restore_s = time.monotonic() - part.taken_at
            part.restored_agents = len(report.images)
            part.replayed = report.replayed
            part.worker = IngestWorker(
                self.nc,
                self.js,
                self.names,
                self.runtime,
                partition=number,
                epoch=epoch,
                floor=report.floor,
                agent_class=self.settings.agent_class,
                reply_subject=self.settings.reply_subject,
                outputs=self.outputs if self.settings.durable_replies else None,
                fetch_batch=self.settings.fetch_batch,
                poisoned=functools.partial(self._poisoned, part),
                touched=part.agents.add,
            )
            await part.worker.open()
        except Exception as err:
            self._lose(part, f"taking it failed ({type(err).__name__}: {err})")
            return
        if self.partitions.get(number) is not part or part.state != "starting":
            return
        self._spawn_cleanup(delete_older_consumers(self.js, self.names, number, epoch))
        log.floor_source = lambda worker=part.worker: worker.floor
        part.state = "serving"
        part.worker.start()
        self._spawn(number, self._wake_scheduled(part, list(report.images)))
        self.counters["taken"] += 1
        metrics.TAKEN.inc()
        metrics.RESTORE_SECONDS.observe(part.restore_s)
        logger.info(
            "cluster: %s took partition %d (epoch %d): %d agents restored, %d log messages "
            "replayed in %.2fs",
            self.name,
            number,
            epoch,
            part.restored_agents,
            part.replayed,
            part.restore_s,
        )

    async def _write_images(self, part: OwnedPartition, images: dict[AgentKey, bytes]) -> None:
        deleting = self._deleting.get(part.number)
        if deleting is not None:  # an earlier hold's files: gone before these are written
            await asyncio.wait([deleting])
        await self.runtime.release_agents(list(images))
        part.agents.update(images)
        state_dir = os.fspath(self.state_dir)
        await asyncio.get_running_loop().run_in_executor(
            None, _write_image_files, state_dir, dict(images)
        )

    async def _wake_scheduled(self, part: OwnedPartition, keys: list[AgentKey]) -> None:
        """Wake the restored agents that have undelivered replies (sent again, deduplicated
        by JetStream), schedules or queued calls: overdue ones run (once: what an earlier
        owner ran and committed is in the log), the rest are armed here."""
        state_dir = os.fspath(self.state_dir)
        outputs, due = await asyncio.get_running_loop().run_in_executor(
            None, _with_alarms, state_dir, keys
        )
        if outputs and part.state == "serving":
            self.runtime.recover_outputs(outputs)
        for key in due:
            if part.state != "serving":
                return
            try:
                await self.runtime.run_in_agent(key[0], key[1], _wake_only)
            except Exception as err:
                logger.warning("cluster: could not wake %s/%r after takeover: %s", *key, err)

    # -- giving a partition up ----------------------------------------------------------------

    async def _release(self, part: OwnedPartition, timeout_s: float) -> None:
        """Graceful: finish and ack what is in flight, then clear the owner."""
        if part.state != "serving":
            return
        part.state = "releasing"
        self._announce_moving(part.number)
        if part.worker is not None:
            await part.worker.stop(graceful=True, timeout_s=timeout_s)
        await self.runtime.release_agents(sorted(part.agents))
        part.state = "released"
        assert self.ownership is not None
        try:
            await self.ownership.release(part.number, part.epoch)
        finally:
            await self._forget(part)
        self.counters["released"] += 1
        metrics.RELEASED.inc()
        logger.info(
            "cluster: %s gave back partition %d (epoch %d)", self.name, part.number, part.epoch
        )

    def _lose(self, part: OwnedPartition, why: str) -> None:
        if part.state in ("lost", "released"):
            return
        logger.warning(
            "cluster: %s lost partition %d (epoch %d): %s", self.name, part.number, part.epoch, why
        )
        part.state = "lost"
        self._announce_moving(part.number)
        self.counters["lost"] += 1
        metrics.LOST.inc()
        self._spawn(part.number, self._after_loss(part))

    def _announce_moving(self, number: int) -> None:
        for listener in list(self.partition_moving):
            try:
                listener(number)
            except Exception:
                logger.exception("cluster: a partition-moving listener failed")

    def _poisoned(self, part: OwnedPartition, why: str) -> None:
        if part.state in ("serving", "releasing"):
            self._lose(part, f"a message could not be applied in order ({why}); taking it again")

    async def _after_loss(self, part: OwnedPartition) -> None:
        if part.worker is not None:
            await part.worker.stop(graceful=False)
        await self.runtime.release_agents(sorted(part.agents | set(part.log.images)))
        assert self.ownership is not None
        try:
            if self.ownership.lease_valid():
                await self.ownership.release(part.number, part.epoch)
        finally:
            await self._forget(part)

    async def _forget(self, part: OwnedPartition) -> None:
        """This member no longer serves the partition (its commits are in the log, its agents
        closed): delete the local files of its agents, so that local listings (MCP
        `agents_list`, the dashboard) show only what the member serves, and a later take
        restores from the log. The agents known to the partition (restored, committed, or
        awake here) are released and deleted; any other database of the partition (by the
        id it stores) found on disk goes too. A take of the partition that began meanwhile
        owns the files: nothing is deleted; one that begins during the deletion waits for it
        (`_write_images`)."""
        number = part.number
        held = self.partitions.get(number)
        if held is part:
            del self.partitions[number]
        elif held is not None:
            return
        partitions = self.settings.partitions
        keys = part.agents | set(part.log.images)
        keys |= {k for k in self.runtime.awake_agents() if partition_of(k[1], partitions) == number}
        await self.runtime.release_agents(sorted(keys))
        if number in self.partitions:
            return  # taken again meanwhile (only when a loss overtook a release): its files
        kept: set[AgentKey] = set()
        for other in self.partitions.values():
            kept |= other.agents | set(other.log.images)
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(
                _delete_partition_files, os.fspath(self.state_dir), number, partitions,
                sorted(keys), kept,
            )
        )  # fmt: skip
        self._deleting[number] = task
        try:
            await asyncio.wait([task])
        finally:
            if self._deleting.get(number) is task:
                del self._deleting[number]
        if task.cancelled() or task.exception() is not None:
            logger.warning(
                "cluster: partition %d: its local files could not all be deleted (%s); "
                "the next start empties the directory",
                number, "cancelled" if task.cancelled() else task.exception(),
            )  # fmt: skip
        elif task.result():
            logger.info(
                "cluster: %s: partition %d: %d local agent databases deleted",
                self.name, number, task.result(),
            )  # fmt: skip

    async def _snapshot(self, part: OwnedPartition) -> None:
        assert self._snapshots is not None
        size = await part.log.snapshot(self._snapshots)
        self.counters["snapshots"] += 1
        logger.info(
            "cluster: partition %d: snapshot of %d agents (%d bytes) at log seq %d",
            part.number,
            len(part.log.images),
            size,
            part.log.last_seq,
        )

    # -- operator view -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        ownership = self.ownership
        parts = {}
        for number, part in sorted(self.partitions.items()):
            worker = part.worker
            parts[str(number)] = {
                "epoch": part.epoch,
                "state": part.state,
                "agents": len(part.agents),
                "log_seq": part.log.last_seq,
                "applied": worker.applied if worker else 0,
                "duplicates": worker.duplicates if worker else 0,
                "floor": worker.floor if worker else 0,
                "consumer": worker.consumer if worker else "",
                "consumers_opened": worker.consumers_opened if worker else 0,
                "restore_s": round(part.restore_s, 3),
                "append_ms": round(
                    1000 * part.log.append_seconds / max(1, part.log.append_count), 2
                ),
                "appends": part.log.append_count,
            }
        return {
            "member": self.name,
            "group": self.settings.group,
            "lease_left_s": round(ownership.lease_left_s(), 2) if ownership else 0.0,
            "alive": ownership.alive() if ownership else [],
            "partitions": parts,
            "changelog_commits": self.replicator.commits,
            "changelog_bytes": self.replicator.bytes,
            **self.counters,
        }


async def connect(settings: ClusterSettings, name: str) -> NatsClient:
    """Connect, trying each server a few times (a wrong CA, password or address fails the
    start with the server's own reason); once connected, reconnect forever."""
    nc = NatsClient()
    options = connect_options(settings, name)
    options["max_reconnect_attempts"] = _FIRST_CONNECT_ROUNDS
    refusals: list[BaseException] = []
    refused = asyncio.Event()

    async def on_error(err: Exception) -> None:
        # A certificate or credentials every server refuses will not get better.
        text = str(err)
        if (
            isinstance(err, ssl.SSLError)
            or "Authorization Violation" in text
            or text.startswith("credentials_file ")  # CredentialsSigner: the file broke
        ):
            refusals.append(err)
            if len(refusals) >= len(settings.servers):
                refused.set()
        logger.warning("cluster: NATS: %s: %s", type(err).__name__, err)

    options["error_cb"] = on_error
    connecting = asyncio.ensure_future(nc.connect(**options))
    waiting = asyncio.ensure_future(refused.wait())
    try:
        # (nats-py may wait forever in a TLS handshake it retries after a failed one.)
        await asyncio.wait({connecting, waiting}, timeout=_FIRST_CONNECT_S,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        waiting.cancel()
        if not connecting.done():
            connecting.cancel()
            raise TimeoutError("no answer in time")
        connecting.result()
    except Exception as err:
        cause = refusals[-1] if refusals else nc.last_error or err
        with contextlib.suppress(Exception):
            await nc.close()
        raise ConnectionError(
            f"no NATS server of {_redacted(settings.servers)} accepted the connection "
            f"({type(cause).__name__}: {cause}){_refused_user(settings, cause)}"
        ) from err
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _refused_user(settings: ClusterSettings, cause: BaseException) -> str:
    """Which user of the credentials file the servers refused (public keys only)."""
    path = settings.credentials_file
    if not path or "Authorization Violation" not in str(cause):
        return ""
    try:
        user = read_user_credentials(path)
    except CredentialsError as err:
        return f"; {err}"
    return (
        f"; credentials_file {path}: the servers refused user {user.user} of account "
        f"{user.account} (an account or operator they do not know, or a revoked user?)"
    )


def connect_options(settings: ClusterSettings, name: str) -> dict[str, Any]:
    s = settings
    options: dict[str, Any] = {
        "servers": list(s.servers),
        "name": f"gatewayd {name}",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.2,
        "connect_timeout": 1,
        **s.nats_credentials(),
    }
    return options


def _redacted(servers: tuple[str, ...]) -> list[str]:
    """The server URLs with any password replaced by `***` (for messages and logs)."""
    shown = []
    for url in servers:
        scheme, sep, rest = url.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
        shown.append(f"{scheme}{sep}{rest}")
    return shown


def _write_image_files(state_dir: str, images: dict[AgentKey, bytes]) -> None:
    for (agent_class, agent_id), image in images.items():
        path = agent_db_file(state_dir, agent_class, agent_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        AgentDatabase.delete_files(path)
        temporary = path + ".restoring"
        with open(temporary, "wb") as out:
            out.write(image)
        os.replace(temporary, path)


def _wake_only(agent: Any) -> None:
    """A turn that only wakes its agent (waking drains overdue schedules and queued calls)."""


def _with_alarms(state_dir: str, keys: list[AgentKey]) -> tuple[list[AgentKey], list[AgentKey]]:
    """`(agents with outbox rows, agents with schedules or queued calls)` among `keys`."""
    outputs, alarms = [], []
    for key in keys:
        path = agent_db_file(state_dir, *key)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                tables = {
                    row[0]
                    for row in conn.execute(
                        "SELECT name FROM sqlite_master "
                        "WHERE name IN ('_gw_schedules', '_gw_queue', '_gw_outbox')"
                    )
                }
                if (
                    "_gw_outbox" in tables
                    and conn.execute("SELECT 1 FROM _gw_outbox LIMIT 1").fetchone()
                ):
                    outputs.append(key)
            finally:
                conn.close()
        except sqlite3.Error:
            continue
        if tables - {"_gw_outbox"}:
            alarms.append(key)
    return outputs, alarms


def _delete_partition_files(
    state_dir: str, number: int, partitions: int, keys: list[AgentKey], kept: set[AgentKey]
) -> int:
    """Delete the files of `keys`, then of every other agent database under `state_dir`
    whose stored id is in partition `number` (`kept`: agents of partitions still held, not
    opened to read their id). How many databases were deleted."""
    deleted = 0
    known = {agent_db_file(state_dir, *key) for key in keys}
    for path in known:
        deleted += os.path.exists(path)
        AgentDatabase.delete_files(path)
    skip = known | {agent_db_file(state_dir, *key) for key in kept}
    for folder, _dirs, names in os.walk(os.path.join(state_dir, "agents")):
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith(".sqlite3") or path in skip:
                continue
            stored = stored_agent_id(path)
            if stored is not None and partition_of(stored, partitions) == number:
                AgentDatabase.delete_files(path)
                deleted += 1
    return deleted


async def _object_store(
    js: JetStreamContext, bucket: str, settings: ClusterSettings
) -> ObjectStore:
    from nats.js.api import ObjectStoreConfig

    deadline = time.monotonic() + _ENSURE_STREAMS_S
    while True:  # (retried as the streams are, see _ensure_streams)
        try:
            return await js.object_store(bucket)
        except Exception:
            pass
        try:
            return await js.create_object_store(
                bucket, config=ObjectStoreConfig(replicas=settings.replicas)
            )
        except Exception as err:
            if time.monotonic() > deadline:
                raise
            logger.info("cluster: object store %s not created yet (%s)", bucket, err)
            await asyncio.sleep(0.3)
