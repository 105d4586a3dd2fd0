"""Prometheus metrics of local generation, `gatewayd_generate_*` (label `model`).

Per request (recorded by `run.Generation`, so the OpenAI endpoint and agents' `self.generate`
both count): requests by finish reason, prompt (prefill) and completion (decode) tokens as
counters (`rate()` gives tokens/s), time to first token and inter-token latency histograms,
requests in flight. Sampled from each generator at scrape time (`GeneratorCollector`):
running and waiting sequences, KV blocks used and free, the prefix cache hit rate and
preemptions, and the prefill and decode tokens the engine computed (when it counts them).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "gatewayd_generate_requests",
    "Generations ended, by finish reason (stop, length, cancelled, error)",
    ["model", "finish_reason"],
)
PROMPT_TOKENS = Counter(
    "gatewayd_generate_prompt_tokens",
    "Prompt tokens prefilled; rate() is prefill tokens/s",
    ["model"],
)
COMPLETION_TOKENS = Counter(
    "gatewayd_generate_completion_tokens",
    "Tokens generated; rate() is decode tokens/s",
    ["model"],
)
IN_FLIGHT = Gauge(
    "gatewayd_generate_requests_in_flight", "Generations started and not yet ended", ["model"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gatewayd_generate_time_to_first_token_seconds",
    "From the request to its first text",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
INTER_TOKEN = Histogram(
    "gatewayd_generate_inter_token_seconds",
    "Between two consecutive pieces of text of one generation",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# stats() key -> (metric name, help); gauges unless named in _COUNTERS.
_SAMPLED = {
    "running": ("gatewayd_generate_running_sequences", "Sequences in the running batch"),
    "waiting": ("gatewayd_generate_waiting_sequences", "Sequences waiting for admission"),
    "kv_blocks_used": ("gatewayd_generate_kv_blocks_used", "KV cache blocks held by sequences"),
    "kv_blocks_free": ("gatewayd_generate_kv_blocks_free", "KV cache blocks available"),
    "prefix_cache_hit_rate": (
        "gatewayd_generate_prefix_cache_hit_rate",
        "Share of full prompt blocks found in the prefix cache",
    ),
    "preemptions_total": (
        "gatewayd_generate_preemptions",
        "Sequences preempted (KV blocks freed, recomputed later)",
    ),
    "prefill_tokens_total": (
        "gatewayd_generate_prefill_tokens_computed",
        "Prompt tokens the engine computed (a prefix-cache hit is not computed; a preempted "
        "sequence is computed again)",
    ),
    "decode_tokens_total": (
        "gatewayd_generate_decode_tokens_computed",
        "Tokens the engine decoded",
    ),
}
_COUNTERS = {"preemptions_total", "prefill_tokens_total", "decode_tokens_total"}


def generator_stats(generator: Any) -> dict[str, float]:
    """`generator.stats()` as a flat dict of numbers (empty for an engine without one)."""
    stats = getattr(generator, "stats", None)
    if callable(stats):
        raw = stats()
        if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
            raw = dataclasses.asdict(raw)
        elif not isinstance(raw, Mapping):
            raw = vars(raw)
        return {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}
    return {}


class GeneratorCollector(Collector):
    """Samples the tracked generators' `stats()` at each scrape (one process-wide instance,
    `COLLECTOR`; the daemon tracks its generators while they run)."""

    def __init__(self) -> None:
        self._generators: dict[str, Any] = {}
        self._lock = threading.Lock()  # scrapes run on the HTTP server's thread

    def track(self, name: str, generator: Any) -> None:
        with self._lock:
            self._generators[name] = generator

    def untrack(self, name: str) -> None:
        with self._lock:
            self._generators.pop(name, None)

    def describe(self) -> Iterator[Any]:
        return iter(())  # sampled lazily: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        families: dict[str, Any] = {}
        for key, (name, help_text) in _SAMPLED.items():
            kind = CounterMetricFamily if key in _COUNTERS else GaugeMetricFamily
            families[key] = kind(name, help_text, labels=["model"])
        with self._lock:
            generators = list(self._generators.items())
        for model, generator in generators:
            try:
                stats = generator_stats(generator)
            except Exception:  # a scrape must never fail because one generator did
                log.debug("generate: stats() of %s failed", model, exc_info=True)
                continue
            for key, family in families.items():
                if key in stats:
                    family.add_metric([model], stats[key])
        yield from families.values()


COLLECTOR = GeneratorCollector()
REGISTRY.register(COLLECTOR)
