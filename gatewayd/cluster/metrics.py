"""Prometheus series of cluster mode (process-wide, registered once at import)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PARTITIONS_OWNED = Gauge(
    "gatewayd_cluster_partitions_owned", "Partitions this member serves (or is restoring)"
)
PARTITION_CHANGES = Counter(
    "gatewayd_cluster_partition_changes_total",
    "Partitions taken, given back (gracefully) or lost (fenced, lease expired, poisoned)",
    ["change"],
)
TAKEN = PARTITION_CHANGES.labels("taken")
RELEASED = PARTITION_CHANGES.labels("released")
LOST = PARTITION_CHANGES.labels("lost")
LEASE_LEFT = Gauge(
    "gatewayd_cluster_lease_seconds_left", "How long this member's lease holds without a heartbeat"
)
APPEND_SECONDS = Histogram(
    "gatewayd_cluster_changelog_append_seconds",
    "Time until a changelog append was replicated (what every commit waits for)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
APPENDED_BYTES = Counter(
    "gatewayd_cluster_changelog_bytes_total", "Page bytes appended to changelogs"
)
RESTORE_SECONDS = Histogram(
    "gatewayd_cluster_restore_seconds",
    "Taking a partition: snapshot + log replay + marker",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
