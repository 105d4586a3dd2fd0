"""Who owns which partition: member heartbeats and partition records in JetStream KV.

- `GW_<group>_MEMBERS`: one key per member, rewritten every heartbeat. A member is alive, in
  another member's eyes, while its key's revision keeps changing: a member whose revision has
  not changed for `lease_s` (measured on the observer's own monotonic clock: no clock sync is
  needed) *while the observer saw its own heartbeats arrive* for a whole lease's worth of
  beats is dead, and its partitions go to the others. Counting the observer's own beats
  keeps a JetStream leader election (the bucket or the observer's watch stalls for several
  seconds after a NATS node dies) from making every member look dead to every other.
- `GW_<group>_PARTITIONS`: one key per partition, `{"owner", "epoch"}`, changed only by
  compare-and-set on the key's revision. Taking a partition increments its epoch; releasing
  it clears the owner and keeps the epoch.

A member trusts its own lease only until `lease_s - heartbeat_s` after sending its last
heartbeat that JetStream confirmed: past that the others may already have declared it dead,
so it stops committing and acknowledging at once (a member paused by SIGSTOP finds its lease
expired the moment it runs again), before it even learns who took its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gatewayd.agents.retry import RetryPolicy, backoff_delay_s
from gatewayd.cluster.naming import Names
from gatewayd.cluster.settings import ClusterSettings

logger = logging.getLogger(__name__)

_STALE_WATCH_BEATS = 3
_BEAT_RETRY = RetryPolicy(base_delay_s=0.05, max_delay_s=0.25)
_CREATE_FOR_S = 20.0


@dataclass(frozen=True, slots=True)
class PartitionRecord:
    owner: str  # "" = released
    epoch: int
    revision: int


class Ownership:
    """This member's view of the members and partition records (kept current by watches)."""

    def __init__(self, js: JetStreamContext, names: Names, settings: ClusterSettings, me: str):
        self._js = js
        self._names = names
        self._settings = settings
        self.me = me
        # What each member's heartbeat says (its client-facing `addresses`, for routing).
        self.member_info: dict[str, dict[str, object]] = {}
        # This member's client-facing addresses ({"ws": url, ...}), sent with each heartbeat.
        self.addresses: dict[str, str] = {}
        # name -> (revision, seen at, this member's own beats seen by then)
        self.members: dict[str, tuple[int, float, int]] = {}
        self.own_beats = 0  # this member's heartbeats its watch delivered back
        self._beats_for_lease = max(2, math.ceil(settings.lease_s / settings.heartbeat_s))
        self.records: dict[int, PartitionRecord] = {}
        self._members_kv: KeyValue | None = None
        self._partitions_kv: KeyValue | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._lease_until = 0.0
        self._puts_unseen = 0  # confirmed heartbeats the members watch has not delivered yet
        self._failing_since = 0.0  # when the first of the heartbeats failing now was sent
        self.changed = asyncio.Event()

    async def open(self) -> None:
        lease = self._settings.lease_s
        self._members_kv = await _bucket(
            self._js,
            KeyValueConfig(
                bucket=self._names.members_bucket,
                history=1,
                ttl=max(60.0, lease * 10),
                replicas=self._settings.replicas,
            ),
        )
        self._partitions_kv = await _bucket(
            self._js,
            KeyValueConfig(
                bucket=self._names.partitions_bucket, history=1, replicas=self._settings.replicas
            ),
        )
        self._start_watches()

    def _start_watches(self) -> None:
        assert self._members_kv is not None and self._partitions_kv is not None
        loop = asyncio.get_running_loop()
        self._watchers = [
            loop.create_task(self._watch(self._members_kv, self._on_member)),
            loop.create_task(self._watch(self._partitions_kv, self._on_partition)),
        ]

    def _restart_watches(self) -> None:
        """The watches' consumers (one replica each) may have died with a NATS node: they
        would come back only after missing several idle heartbeats; start new ones now."""
        logger.warning(
            "cluster: %s: its watches did not deliver its last %d heartbeats; watching again",
            self.me,
            self._puts_unseen,
        )
        for task in self._watchers:
            task.cancel()
        self._puts_unseen = 0
        self._start_watches()

    async def close(self, *, leave: bool) -> None:
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if leave and self._members_kv is not None:
            with contextlib.suppress(Exception):
                await self._members_kv.delete(self.me)

    # -- heartbeats and liveness ------------------------------------------------------------

    async def heartbeat(self, partitions: list[int]) -> bool:
        """Renew this member's lease; False when JetStream did not confirm it within one
        heartbeat period. A put refused at once (no leader for the bucket: it is electing one)
        is tried again within the period on a short jittered schedule, so the lease is
        confirmed within a fraction of a second of the election; one not answered (sent to a
        leader that died) is given up at the period's end."""
        assert self._members_kv is not None
        record: dict[str, object] = {"member": self.me, "at": time.time(), "partitions": partitions}
        if self.addresses:
            record["addresses"] = self.addresses
        body = json.dumps(record).encode()
        period_end = time.monotonic() + self._settings.heartbeat_s
        attempt = 0
        while True:
            sent = time.monotonic()
            try:
                await asyncio.wait_for(
                    self._members_kv.put(self.me, body), max(0.05, period_end - sent)
                )
                break
            except Exception as err:
                attempt += 1
                delay = backoff_delay_s(attempt, _BEAT_RETRY)
                if time.monotonic() + delay < period_end:
                    await asyncio.sleep(delay)
                    continue
                logger.warning(
                    "cluster: heartbeat failed: %s (%d tries)", f"{type(err).__name__}: {err}",
                    attempt,
                )  # fmt: skip
                self._failing_since = self._failing_since or sent
                return False
        if self._failing_since:
            logger.info(
                "cluster: %s: heartbeat confirmed again after %.2fs of failures",
                self.me, time.monotonic() - self._failing_since,
            )  # fmt: skip
            self._failing_since = 0.0
        self._lease_until = sent + self._settings.lease_s - self._settings.heartbeat_s
        self._puts_unseen += 1
        if self._puts_unseen > _STALE_WATCH_BEATS:
            self._restart_watches()
        return True

    def lease_valid(self) -> bool:
        return time.monotonic() < self._lease_until

    def lease_left_s(self) -> float:
        return self._lease_until - time.monotonic()

    def alive(self) -> list[str]:
        """Members whose heartbeat this member saw change within the lease, or since which it
        did not see a lease's worth of its own (itself included while its own lease holds)."""
        now = time.monotonic()
        lease, needed = self._settings.lease_s, self._beats_for_lease
        names = {
            name
            for name, (_, seen, beats) in self.members.items()
            if now - seen < lease or self.own_beats - beats < needed
        }
        names.discard(self.me)
        if self.lease_valid():
            names.add(self.me)
        return sorted(names)

    # -- partition records --------------------------------------------------------------------

    async def take(self, partition: int) -> int | None:
        """Compare-and-set the partition to this member with the next epoch; its epoch or None
        when the record changed meanwhile."""
        assert self._partitions_kv is not None
        key = self._names.partition_key(partition)
        record = self.records.get(partition)
        try:
            if record is None:
                epoch = 1
                revision = await self._partitions_kv.create(key, _encode(self.me, epoch))
            else:
                epoch = record.epoch + 1
                revision = await self._partitions_kv.update(
                    key, _encode(self.me, epoch), last=record.revision
                )
        except (KeyWrongLastSequenceError, Exception) as err:
            logger.debug("cluster: could not take partition %d: %s", partition, err)
            return None
        self.records[partition] = PartitionRecord(self.me, epoch, revision)
        return epoch

    async def release(self, partition: int, epoch: int) -> bool:
        """Clear the owner if the record is still this member's `epoch`."""
        assert self._partitions_kv is not None
        record = self.records.get(partition)
        if record is None or record.owner != self.me or record.epoch != epoch:
            return False
        try:
            revision = await self._partitions_kv.update(
                self._names.partition_key(partition), _encode("", epoch), last=record.revision
            )
        except Exception as err:
            logger.debug("cluster: could not release partition %d: %s", partition, err)
            return False
        self.records[partition] = PartitionRecord("", epoch, revision)
        return True

    async def refresh(self, partition: int) -> PartitionRecord | None:
        """Read the partition's record from the bucket itself (not the watch, which may lag);
        None when it has none. Raises when the bucket does not answer within two heartbeats
        (electing its leader: the caller asks again after the next heartbeat)."""
        assert self._partitions_kv is not None
        try:
            entry = await asyncio.wait_for(
                self._partitions_kv.get(self._names.partition_key(partition)),
                2 * self._settings.heartbeat_s,
            )
        except KeyNotFoundError:
            self.records.pop(partition, None)
            return None
        raw = json.loads(entry.value or b"{}")
        record = PartitionRecord(
            str(raw.get("owner", "")), int(raw.get("epoch", 0)), int(entry.revision or 0)
        )
        known = self.records.get(partition)
        if known is None or known.revision <= record.revision:
            self.records[partition] = record
        return record

    def holds(self, partition: int, epoch: int) -> bool:
        """The record (as last seen) says this member owns `partition` at `epoch`."""
        record = self.records.get(partition)
        return record is not None and record.owner == self.me and record.epoch == epoch

    # -- watches ------------------------------------------------------------------------------

    async def _watch(self, kv: KeyValue, apply: object) -> None:
        while True:
            try:
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        continue
                    apply(entry)  # type: ignore[operator]
                    self.changed.set()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                logger.warning("cluster: KV watch of %s failed (%s); watching again", kv, err)
                await asyncio.sleep(0.5)

    def _on_member(self, entry: object) -> None:
        key = getattr(entry, "key", "")
        if getattr(entry, "operation", None) in ("DEL", "PURGE"):
            self.members.pop(key, None)
            self.member_info.pop(key, None)
            return
        revision = int(getattr(entry, "revision", 0) or 0)
        with contextlib.suppress(ValueError):
            info = json.loads(getattr(entry, "value", b"") or b"{}")
            if isinstance(info, dict):
                self.member_info[key] = info
        known = self.members.get(key)
        if known is None or known[0] != revision:
            if key == self.me:
                self.own_beats += 1
                self._puts_unseen = 0
            self.members[key] = (revision, time.monotonic(), self.own_beats)

    def _on_partition(self, entry: object) -> None:
        key = getattr(entry, "key", "")
        if not key.startswith("p") or not key[1:].isdigit():
            return
        partition = int(key[1:])
        revision = int(getattr(entry, "revision", 0) or 0)
        known = self.records.get(partition)
        if known is not None and known.revision >= revision:
            return  # our own compare-and-set already recorded it
        if getattr(entry, "operation", None) in ("DEL", "PURGE"):
            self.records.pop(partition, None)
            return
        raw = json.loads(getattr(entry, "value", b"") or b"{}")
        self.records[partition] = PartitionRecord(
            str(raw.get("owner", "")), int(raw.get("epoch", 0)), revision
        )


def _encode(owner: str, epoch: int) -> bytes:
    return json.dumps({"owner": owner, "epoch": epoch}).encode()


async def _bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Open or create the bucket; retried for a while (another member may be creating it, or a
    NATS cluster that has just started cannot place its replicas yet)."""
    deadline = time.monotonic() + _CREATE_FOR_S
    while True:
        try:
            return await js.key_value(config.bucket)
        except (BucketNotFoundError, KeyNotFoundError, Exception):
            pass
        try:
            return await js.create_key_value(config)
        except Exception as err:
            if time.monotonic() > deadline:
                raise
            logger.info("cluster: bucket %s not created yet (%s)", config.bucket, err)
            await asyncio.sleep(0.3)
