"""Prometheus metrics and the plain counters (`AgentRuntime.stats()`) of the agent runtime.

Process-wide Prometheus series (registered once at import); the counters are per runtime.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TURNS = Counter("gatewayd_agent_turns_total", "Agent turns run, by result", ["result"])
TURNS_OK = TURNS.labels("ok")  # cached children: labels() per turn is measurable
TURNS_ERROR = TURNS.labels("error")
COMMITS = Counter("gatewayd_agent_commits_total", "Agent transactions committed")
COMMIT_ERRORS = Counter("gatewayd_agent_commit_errors_total", "Agent commits that failed")
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
