"""Names of the group's streams, buckets and subjects, and the partition of an agent id.

The partition function is NATS's own subject-mapping `partition(P, i)` (FNV-1a, 32 bits, of the
mapped token, modulo P), so the server's mapping of device subjects and the member's own view
of which partition an agent belongs to always agree (tests/cluster checks it against a real
server).
"""

from __future__ import annotations

import hashlib

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def partition_of(agent_id: str, partitions: int) -> int:
    """The partition NATS's `{{partition(partitions, i)}}` maps the token `agent_id` to."""
    value = _FNV_OFFSET
    for byte in agent_id.encode("utf-8"):
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value % partitions


def preferred_owner(partition: int, members: list[str]) -> str:
    """Rendezvous (highest random weight) hashing: each partition's owner among `members`.
    A member joining or leaving moves only the partitions it gains or had (about P/N)."""
    return max(members, key=lambda name: hashlib.blake2b(f"{partition}/{name}".encode()).digest())


class Names:
    """Every JetStream name one group uses (group `site` -> stream `GW_site_IN`, ...)."""

    def __init__(self, group: str, ingest_subject: str) -> None:
        self.group = group
        self.ingest_subject = ingest_subject
        self.ingest_stream = f"GW_{group}_IN"
        self.log_stream = f"GW_{group}_LOG"
        self.replies_stream = f"GW_{group}_OUT"
        self.members_bucket = f"GW_{group}_MEMBERS"
        self.partitions_bucket = f"GW_{group}_PARTITIONS"
        self.snapshots_bucket = f"GW_{group}_SNAPSHOTS"
        self.log_prefix = f"gw.{group}.log"

    def ingest_filter(self, partition: int) -> str:
        return f"{self.ingest_subject}.{partition}.>"

    def log_subject(self, partition: int) -> str:
        return f"{self.log_prefix}.{partition}"

    def consumer(self, partition: int, epoch: int, generation: int = 0) -> str:
        """The `generation`th ingest consumer of `partition`'s owner at `epoch`."""
        return f"p{partition}-e{epoch}-{generation}"

    @staticmethod
    def consumer_partition_epoch(name: str) -> tuple[int, int] | None:
        """`(partition, epoch)` of an ingest consumer's name (None for any other name)."""
        head, _, rest = name.partition("-e")
        epoch, _, generation = rest.partition("-")
        if not head.startswith("p") or not head[1:].isdigit() or not epoch.isdigit():
            return None
        if not generation.isdigit():
            return None
        return int(head[1:]), int(epoch)

    def partition_key(self, partition: int) -> str:
        return f"p{partition}"

    def snapshot_name(self, partition: int) -> str:
        return f"p{partition}"

    def agent_of(self, subject: str) -> tuple[int, str] | None:
        """`(partition, agent id)` of an ingest subject `<ingest>.<partition>.<id>[.more]`."""
        prefix = self.ingest_subject + "."
        if not subject.startswith(prefix):
            return None
        parts = subject[len(prefix) :].split(".")
        if len(parts) < 2 or not parts[0].isdigit() or not parts[1]:
            return None
        return int(parts[0]), parts[1]
