"""The agent runtime's hook in cluster mode: every batch's writes go to the changelog first.

`before_commit` runs after a batch's turns and before its COMMIT (batch.py): it waits while
the member's lease is being confirmed again, then refuses the batch unless this member owns
the agent's partition with a valid lease, then appends the
pages the batch changed to the partition's changelog and waits until JetStream has them
replicated. Only then does the batch COMMIT locally and release its outputs and acks. The
local SQLite file is a cache of the log: if the append fails, nothing commits; if the local
COMMIT fails after the append, the partition is poisoned and restored from the log.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Protocol

from gatewayd.agents.errors import CommitError
from gatewayd.cluster.changelog import PartitionLog
from gatewayd.cluster.metrics import APPENDED_BYTES
from gatewayd.cluster.pages import diff

AgentKey = tuple[str, str]


class NotOwnerError(CommitError):
    """This member does not own (or no longer owns) the agent's partition."""


class Partitions(Protocol):
    async def wait_writable(self, agent_id: str) -> None: ...

    def writable_log(self, agent_id: str) -> tuple[PartitionLog | None, str]: ...

    def appended(self, log: PartitionLog, key: AgentKey) -> None: ...


class Replicator:
    """`gatewayd.agents.batch.Replicator` for a cluster member."""

    def __init__(self, partitions: Partitions, clock: Callable[[], float] = time.perf_counter):
        self._partitions = partitions
        self._clock = clock
        self.commits = 0
        self.bytes = 0
        self.seconds = 0.0  # serialising, diffing and waiting for the log, all together

    async def before_commit(self, key: AgentKey, connection: sqlite3.Connection) -> None:
        started = self._clock()
        await self._partitions.wait_writable(key[1])
        log, why = self._partitions.writable_log(key[1])
        if log is None:
            raise NotOwnerError(f"agent {key[0]}/{key[1]!r}: {why}; nothing committed")
        image = connection.serialize()
        change = diff(key[0], key[1], log.images.get(key, b""), image)
        if change is not None:
            await log.append(change, image)
            self.bytes += change.size
            APPENDED_BYTES.inc(change.size)
            self._partitions.appended(log, key)
        self.commits += 1
        self.seconds += self._clock() - started
