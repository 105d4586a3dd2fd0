"""The TCP listener's per-frame Prometheus series, as plain integers read at scrape time.

`gatewayd_tcp_frames_received_total{type}` and `gatewayd_tcp_data_outcomes_total{outcome}`
move once or twice for every frame. A `prometheus_client` `Counter.inc()` takes a lock (~1 µs);
publishing ints once per loop iteration still cost, under paced load (one frame per
iteration), two `inc()`s, two `call_soon`s and one extra loop iteration per frame. So the
counts are process-wide ints in `COUNTS`, bumped on the event loop thread, and a collector
(`prometheus_client`'s custom-collector interface) reads them when the registry is scraped:
always exact, nothing to publish.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from protocols.frames import FrameType

__all__ = ["COUNTS", "OUTCOME_NAMES"]

# The `outcome` label's values, in exposition order.
OUTCOME_NAMES = ("applied", "duplicate", "not_applied", "rejected")


class TcpCounts:
    """Frames received by type byte, and DATA outcomes by name (process-wide, all listeners)."""

    def __init__(self) -> None:
        # Indexed by the type's byte: hashing an IntEnum member runs Python.
        self.frames_by_type = [0] * 256
        self.outcomes = dict.fromkeys(OUTCOME_NAMES, 0)


COUNTS = TcpCounts()


class _TcpCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        frames = CounterMetricFamily(
            "gatewayd_tcp_frames_received", "Frames received from devices", labels=["type"]
        )
        for frame_type in FrameType:
            frames.add_metric([frame_type.name], COUNTS.frames_by_type[frame_type])
        yield frames
        outcomes = CounterMetricFamily(
            "gatewayd_tcp_data_outcomes",
            "DATA frames by outcome (applied, duplicate, not_applied, rejected)",
            labels=["outcome"],
        )
        for name, value in COUNTS.outcomes.items():
            outcomes.add_metric([name], value)
        yield outcomes


REGISTRY.register(_TcpCollector())
