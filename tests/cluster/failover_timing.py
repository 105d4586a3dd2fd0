"""When things happened around a NATS node's loss, for the failover tests: when each JetStream
leader was known again, when the publisher's messages were acknowledged, and when each
message was applied (the time JetStream stored the changelog message that first holds it).

Times are seconds after the kill: the test's monotonic clock for what the test sees, the
servers' storage timestamps (same host, wall clock) for the changelog.
"""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
import time
from collections.abc import Iterable

import nats
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from gatewayd.cluster.naming import Names
from gatewayd.cluster.pages import LogMessage, apply
from tests.cluster.group import GROUP, Publisher, read_stream
from tests.cluster.nats_cluster import NatsCluster

Applied = tuple[str, str]  # (agent id, message)


class Kill:
    """The moment of a kill on both clocks."""

    def __init__(self) -> None:
        self.monotonic = time.monotonic()
        self.wall = time.time()

    def since(self) -> float:
        return time.monotonic() - self.monotonic

    def of_wall(self, moment: datetime.datetime) -> float:
        return moment.timestamp() - self.wall


class LeaderWatch:
    """Polls the running nodes' view of the leaders until each of `names` (streams, and `META`
    for the meta group) has a running leader: `known[name]` = seconds after the kill."""

    def __init__(self, cluster: NatsCluster, names: Iterable[str]) -> None:
        self._cluster = cluster
        self._names = set(names)
        self.known: dict[str, float] = {}
        self.before: dict[str, str] = {}

    def note_before(self) -> None:
        """Who led what just before the kill (to tell which elections the kill caused)."""
        self.before = self._cluster.leaders()

    async def run(self, kill: Kill, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._names - set(self.known) and time.monotonic() < deadline:
            leaders = await asyncio.to_thread(self._cluster.leaders)
            at = kill.since()
            for name in self._names - set(self.known):
                if leaders.get(name):
                    self.known[name] = at
            await asyncio.sleep(0.05)

    def done_at(self) -> float:
        """When the last of them was known again (inf: one never was)."""
        missing = self._names - set(self.known)
        return float("inf") if missing else max(self.known.values(), default=0.0)


class AckClock:
    """Samples how many messages `publisher` has had acknowledged: `at(i)` is when the i-th
    acknowledged message (its index in `publisher.acked`) was, within a sample's period."""

    PERIOD_S = 0.02

    def __init__(self, publisher: Publisher, kill: Kill) -> None:
        self._publisher = publisher
        self._kill = kill
        self._samples: list[tuple[float, int]] = []  # (seconds after the kill, acked count)

    async def run(self) -> None:
        while True:
            self._samples.append((self._kill.since(), len(self._publisher.acked)))
            await asyncio.sleep(self.PERIOD_S)

    def at(self, index: int) -> float:
        """(The last sample's time for an index past the last acknowledged message.)"""
        for moment, count in self._samples:
            if count > index:
                return moment
        return self._samples[-1][0] if self._samples else 0.0

    def first_after(self, moment: float) -> float:
        """When the count first grew at or after `moment` (inf: never)."""
        previous = None
        for at, count in self._samples:
            if at >= moment and previous is not None and count > previous:
                return at
            previous = count
        return float("inf")


async def applied_times(
    nc: nats.NATS, partitions: int, kill: Kill, group: str = GROUP
) -> dict[Applied, float]:
    """When each message was applied: the storage time (seconds after the kill) of the first
    changelog message whose pages hold it in the agent's `seen` table."""
    names = Names(group, "gw.in")
    js = nc.jetstream(timeout=5)
    found: dict[Applied, float] = {}
    for partition in range(partitions):
        images: dict[str, bytes] = {}
        seen: dict[str, int] = {}
        for stored, data in await _log_with_times(js, names, partition):
            for change in LogMessage.decode(data).changes:
                image = apply(images.get(change.agent_id, b""), change)
                images[change.agent_id] = image
                messages = _seen(image)
                for message in messages[seen.get(change.agent_id, 0) :]:
                    found.setdefault((change.agent_id, message), kill.of_wall(stored))
                seen[change.agent_id] = len(messages)
    return found


def _seen(image: bytes) -> list[str]:
    conn = sqlite3.connect(":memory:")
    legacy = bytearray(image)
    legacy[18:20] = b"\x01\x01"  # (a WAL-mode image reads only as a rollback-journal one)
    try:
        conn.deserialize(bytes(legacy))
        return [row[0] for row in conn.execute("SELECT message FROM seen ORDER BY rowid")]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


async def _log_with_times(
    js: JetStreamContext, names: Names, partition: int
) -> list[tuple[datetime.datetime, bytes]]:
    """Every message of a partition's changelog with its storage time, in order (the tests
    take no snapshots: the log is whole). Read through a one-replica consumer; one that
    lands on a NATS node that is down, or loses a delivery, is replaced."""
    subject = names.log_subject(partition)
    try:
        last = int((await js.get_last_msg(names.log_stream, subject)).seq or 0)
    except NotFoundError:
        return []
    msgs = await read_stream(js, names.log_stream, last, filter_subject=subject)
    return [(msg.metadata.timestamp, msg.data) for msg in msgs]
