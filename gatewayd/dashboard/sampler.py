"""Samples the daemon's metrics every `interval_s` into a ring buffer of the last minutes.

Each sample is one flat JSON object (`t` in epoch seconds, then numbers or strings): rates are
per second over the last interval, latencies the mean over it. Sources: the Prometheus
registry (agents, commits, MQTT, TCP, engine, generation: whatever is registered), the
transports' own counters (messages in/out), and the runtime's stats. Missing sources (no
engine, MQTT off) give no key, and the page leaves that tile out.

Reading the registry costs well under a millisecond per second of wall time; the sampler runs
on the daemon's event loop (the registry's collectors are cheap and never block).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Sample = dict[str, Any]

# counter family -> sample key of its per-second rate (all label values summed)
RATES = {
    "gatewayd_agent_commits": "commits_per_s",
    "gatewayd_agent_turns": "turns_per_s",
    "gatewayd_agent_wakes": "wakes_per_s",
    "gatewayd_agent_hibernations": "hibernations_per_s",
    "gatewayd_mqtt_published": "mqtt_published_per_s",
    "gatewayd_engine_requests": "engine_requests_per_s",
    # Local generation (gatewayd/generation/metrics.py), when generators run.
    "gatewayd_generate_completion_tokens": "gen_tokens_per_s",
    "gatewayd_generate_prompt_tokens": "gen_prompt_tokens_per_s",
}
# gauge family -> sample key of its value (summed over labels)
GAUGES = {
    "gatewayd_agents_active": "agents_awake",
    "gatewayd_mqtt_connected": "mqtt_connected",
    "gatewayd_mqtt_pending_messages": "mqtt_pending",
    "gatewayd_tcp_connections": "tcp_devices",
    "gatewayd_outbox_undelivered": "outbox_undelivered",
    "gatewayd_engine_queued_rows": "engine_queued_rows",
    "gatewayd_generate_running_sequences": "gen_running",
    "gatewayd_generate_waiting_sequences": "gen_waiting",
}
KV_USED, KV_FREE = "gatewayd_generate_kv_blocks_used", "gatewayd_generate_kv_blocks_free"
# histogram family -> sample key of its mean over the interval, in milliseconds
MEANS_MS = {
    "gatewayd_agent_commit_group_seconds": "commit_latency_ms",
    "gatewayd_agent_turn_seconds": "turn_latency_ms",
    "gatewayd_engine_run_seconds": "engine_run_ms",
    "gatewayd_generate_time_to_first_token_seconds": "gen_ttft_ms",
}
BATCH_ROWS = "gatewayd_engine_batch_rows"  # histogram: the batch-size distribution
ENGINE_BATCHES = "gatewayd_engine_batches"  # counter with a `phase` label


class Sampler:
    """`await start()` runs the sampling loop; `samples(since)` reads the ring buffer."""

    def __init__(
        self,
        components: Any,
        *,
        interval_s: float = 1.0,
        history_s: float = 600.0,
        registry: Collector = REGISTRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.components = components
        self.interval_s = interval_s
        self._registry = registry
        self._clock = clock
        self._ring: deque[Sample] = deque(maxlen=max(2, math.ceil(history_s / interval_s)))
        self._previous: dict[str, float] = {}
        self._previous_at: float | None = None
        self._started_at = clock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._run(), name="dashboard-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                self.sample()
            except Exception:  # a broken collector must not end the charts
                log.exception("dashboard: sampling the metrics failed")

    def samples(self, since: float = 0.0) -> list[Sample]:
        """The samples taken after `since` (epoch seconds), oldest first."""
        return [s for s in self._ring if s["t"] > since]

    @property
    def latest(self) -> Sample | None:
        return self._ring[-1] if self._ring else None

    def sample(self) -> Sample:
        """Take one sample now and append it to the ring buffer."""
        now = self._clock()
        totals, sample = self._read_registry()
        self._add_transports(totals, sample)
        elapsed = None if self._previous_at is None else now - self._previous_at
        for key, total in totals.items():
            if key.endswith("__sum") or key.endswith("__count"):
                continue
            previous = self._previous.get(key)
            if elapsed and previous is not None and elapsed > 0:
                sample[key] = round(max(0.0, total - previous) / elapsed, 3)
        for key in {k[: -len("__sum")] for k in totals if k.endswith("__sum")}:
            count = totals.get(key + "__count", 0.0) - self._previous.get(key + "__count", 0.0)
            total = totals[key + "__sum"] - self._previous.get(key + "__sum", 0.0)
            if elapsed is not None and count > 0:
                sample[key] = round(total / count * 1000.0, 3)
        self._previous, self._previous_at = totals, now
        sample["t"] = round(now, 3)
        sample["uptime_s"] = round(now - sample.pop("_process_start", self._started_at), 1)
        self._ring.append(sample)
        return sample

    # -- sources -----------------------------------------------------------------------------

    def _read_registry(self) -> tuple[dict[str, float], Sample]:
        """Running totals (for rates and means) and values (gauges, distributions)."""
        totals: dict[str, float] = {}
        sample: Sample = {}
        batch_buckets: dict[str, float] = {}
        kv: dict[str, float] = {}
        for family in self._registry.collect():
            name, kind = family.name, family.type
            if name == "process_start_time_seconds":
                sample["_process_start"] = _sum(s.value for s in family.samples)
            elif name in RATES and kind == "counter":
                totals[RATES[name]] = _sum(
                    s.value for s in family.samples if s.name.endswith("_total")
                )
            elif name in GAUGES:
                sample[GAUGES[name]] = _sum(s.value for s in family.samples)
            elif name in MEANS_MS and kind == "histogram":
                key = MEANS_MS[name]
                totals[key + "__sum"] = _sum(
                    s.value for s in family.samples if s.name.endswith("_sum")
                )
                totals[key + "__count"] = _sum(
                    s.value for s in family.samples if s.name.endswith("_count")
                )
            elif name == ENGINE_BATCHES:
                totals["engine_batches_per_s"] = _sum(
                    s.value
                    for s in family.samples
                    if s.name.endswith("_total") and s.labels.get("phase") != "warmup"
                )
            elif name == BATCH_ROWS and kind == "histogram":
                for s in family.samples:
                    if s.name.endswith("_bucket"):
                        le = s.labels.get("le", "+Inf")
                        batch_buckets[le] = batch_buckets.get(le, 0.0) + s.value
            elif name == "gatewayd_mqtt_events" and kind == "counter":
                for s in family.samples:
                    if s.name.endswith("_total") and s.labels.get("event") == "not_allowed":
                        sample["mqtt_not_allowed_total"] = (
                            sample.get("mqtt_not_allowed_total", 0) + s.value
                        )
            elif name in (KV_USED, KV_FREE):
                kv[name] = kv.get(name, 0.0) + _sum(s.value for s in family.samples)
        if batch_buckets:
            sample["batch_size_histogram"] = _distribution(batch_buckets)
        kv_blocks = kv.get(KV_USED, 0.0) + kv.get(KV_FREE, 0.0)
        if kv_blocks > 0:
            sample["kv_usage_pct"] = round(kv.get(KV_USED, 0.0) / kv_blocks * 100.0, 1)
        return totals, sample

    def _add_transports(self, totals: dict[str, float], sample: Sample) -> None:
        components = self.components
        for name, transport in dict(getattr(components, "transports", {}) or {}).items():
            stats = transport.stats
            totals[f"{name}_in_per_s"] = float(stats.messages_in)
            totals[f"{name}_out_per_s"] = float(stats.messages_out)
            sample[f"{name}_in_total"] = stats.messages_in
            sample[f"{name}_out_total"] = stats.messages_out
            if name == "ws":
                sample["ws_clients"] = stats.links_open
            elif name == "mqtt":
                sample["mqtt_devices"] = stats.links_open
                sample["mqtt_state"] = transport.state
                sample["mqtt_broker"] = transport.broker
                sample["mqtt_pending_acks"] = stats.extra.get("pending", 0) + stats.extra.get(
                    "outbound_publishing", 0
                )
            elif name == "tcp":
                sample["tcp_devices"] = stats.links_open
        runtime = getattr(components, "runtime", None)
        if runtime is not None:
            stats = runtime.stats()
            sample["agents_awake"] = stats.get("active_agents", 0)
            sample["events_queued"] = stats.get("events_queued", 0)
            totals["turn_errors_per_s"] = float(stats.get("turn_errors", 0))
        generators = getattr(components, "generators", None) or {}
        if generators:
            sample["generators"] = len(generators)


def _sum(values: Iterable[float]) -> float:
    return float(sum(values))


def _distribution(cumulative: dict[str, float]) -> list[list[Any]]:
    """Cumulative `le` buckets -> [[upper bound label, count in that bucket], ...]."""
    ordered = sorted(
        cumulative.items(), key=lambda kv: math.inf if kv[0] == "+Inf" else float(kv[0])
    )
    out: list[list[Any]] = []
    below = 0.0
    for le, count in ordered:
        label = le if le == "+Inf" else f"{float(le):g}"
        out.append([label, int(count - below)])
        below = count
    return out
