"""Prometheus metrics and the plain counters (`AgentRuntime.stats()`) of the agent runtime.

Process-wide Prometheus series (registered once at import); the counters are per runtime.

The series counted once or more per turn (turns, commits, outbox events) and the turn-latency
histogram are plain integers and lists in `HOT`, bumped on the event loop thread, and read by
a collector (`prometheus_client`'s custom-collector interface) when the registry is scraped:
a `Counter.inc()` takes a lock and costs ~1 µs, a `Histogram.observe()` ~2 µs, several times
per turn. They are never touched off the loop.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

WAKES = Counter("gatewayd_agent_wakes_total", "Agents woken from hibernation or first start")
HIBERNATIONS = Counter("gatewayd_agent_hibernations_total", "Agents evicted from memory")
MAILBOX_FULL = Counter(
    "gatewayd_agent_mailbox_full_total",
    "Events and calls refused because an agent's mailbox (or the pending calls) was full; "
    "transports hold and resubmit them (Backpressure), calls fail with MailboxFullError",
)
ACTIVE = Gauge("gatewayd_agents_active", "Agents currently in memory")
COMMIT_SECONDS = Histogram(
    "gatewayd_agent_commit_group_seconds",
    "Time to commit one group of agent transactions on one commit thread "
    "(includes the fsyncs with durability=full)",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
)

# Upper bounds of `gatewayd_agent_turn_seconds` (then +Inf).
TURN_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
OUTBOX_EVENT_NAMES = ("written", "handed_over", "delivered", "resent_after_restart", "refused_full")


class TurnLatency:
    """One agent class's `gatewayd_agent_turn_seconds`: bucket counts and sum."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(TURN_BUCKETS) + 1)
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(TURN_BUCKETS, seconds)] += 1
        self.total_s += seconds


class HotCounters:
    """The per-turn series (process-wide, event loop thread only)."""

    __slots__ = ("commit_errors", "commits", "outbox", "turn_latency", "turns_error", "turns_ok")

    def __init__(self) -> None:
        self.turns_ok = 0
        self.turns_error = 0
        self.commits = 0
        self.commit_errors = 0
        self.outbox = dict.fromkeys(OUTBOX_EVENT_NAMES, 0)
        self.turn_latency: dict[str, TurnLatency] = {}

    def latency_of(self, agent_class: str) -> TurnLatency:
        latency = self.turn_latency.get(agent_class)
        if latency is None:
            latency = self.turn_latency[agent_class] = TurnLatency()
        return latency


HOT = HotCounters()


class _HotCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        turns = CounterMetricFamily(
            "gatewayd_agent_turns", "Agent turns run, by result", labels=["result"]
        )
        turns.add_metric(["ok"], HOT.turns_ok)
        turns.add_metric(["error"], HOT.turns_error)
        yield turns
        yield CounterMetricFamily(
            "gatewayd_agent_commits", "Agent transactions committed", value=HOT.commits
        )
        yield CounterMetricFamily(
            "gatewayd_agent_commit_errors", "Agent commits that failed", value=HOT.commit_errors
        )
        outbox = CounterMetricFamily(
            "gatewayd_outbox_events",
            "Durable outputs: written, handed_over, delivered, resent_after_restart, refused_full",
            labels=["event"],
        )
        for name, value in HOT.outbox.items():
            outbox.add_metric([name], value)
        yield outbox
        latency = HistogramMetricFamily(
            "gatewayd_agent_turn_seconds",
            "Time one agent turn ran (its handler and its SQL; not the commit, not the time "
            "queued), by agent class; observed for every turn",
            labels=["agent_class"],
        )
        bounds = [*(repr(b) for b in TURN_BUCKETS), "+Inf"]
        for agent_class, turn in list(HOT.turn_latency.items()):
            cumulative, running = [], 0
            for bound, count in zip(bounds, turn.counts, strict=True):
                running += count
                cumulative.append((bound, running))
            latency.add_metric([agent_class], cumulative, turn.total_s)
        yield latency


REGISTRY.register(_HotCollector())

COUNTER_NAMES = (
    "turns_total",
    "turn_errors",
    "turn_timeouts",
    "commits_total",
    "commit_errors",
    "wakes_total",
    "hibernations_total",
    "duplicates_total",
    "protocol_errors",
    "rejected_total",
    "mailbox_full_total",
)


def new_counters() -> dict[str, int]:
    """One runtime's counters, shared by its modules (a plain dict: cheap on the hot path)."""
    return dict.fromkeys(COUNTER_NAMES, 0)
