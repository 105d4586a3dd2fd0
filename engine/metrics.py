"""Prometheus metrics of the engine, defined once for the process (label `model`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0
)  # fmt: skip

REQUESTS = Counter(
    "gatewayd_engine_requests", "Inference requests accepted into the queue.", ["model"]
)
REJECTED = Counter(
    "gatewayd_engine_rejected",
    "Requests refused before queueing (reason: overloaded, invalid_input).",
    ["model", "reason"],
)
TIMED_OUT = Counter(
    "gatewayd_engine_timed_out",
    "Requests whose deadline passed while queued (never run).",
    ["model"],
)
FAILED = Counter(
    "gatewayd_engine_failed", "Requests in a batch whose ONNX Runtime run raised.", ["model"]
)
BATCHES = Counter(
    "gatewayd_engine_batches",
    "Session runs per bucket (phase: warmup or serve).",
    ["model", "bucket", "phase"],
)
INLINE_BATCHES = Counter(
    "gatewayd_engine_inline_batches",
    "Batches run on the event loop's thread instead of the worker (inline_max_run_s).",
    ["model"],
)
BATCH_ROWS = Histogram(
    "gatewayd_engine_batch_rows",
    "Real (unpadded) rows per batch.",
    ["model"],
    buckets=_ROW_BUCKETS,
)
PADDING_ROWS = Counter(
    "gatewayd_engine_padding_rows", "Rows of padding added to reach a bucket.", ["model"]
)
QUEUE_DELAY = Histogram(
    "gatewayd_engine_queue_delay_seconds",
    "Per batch: time its oldest request waited from infer() to dispatch (the batch's worst "
    "case; one observation per batch keeps the worker's per-request cost down).",
    ["model"],
    buckets=_SECONDS_BUCKETS,
)
RUN_SECONDS = Histogram(
    "gatewayd_engine_run_seconds",
    "Wall time of one batch in the worker (copy in, run, copy out).",
    ["model"],
    buckets=_SECONDS_BUCKETS,
)
BATCH_CPU_SECONDS = Histogram(
    "gatewayd_engine_batch_cpu_seconds",
    "CPU time of the worker thread per batch (includes ORT intra-op work on that thread).",
    ["model"],
    buckets=_SECONDS_BUCKETS,
)
QUEUED_ROWS = Gauge("gatewayd_engine_queued_rows", "Rows waiting in the queue.", ["model"])
WARMUP_SECONDS = Gauge(
    "gatewayd_engine_warmup_seconds",
    "Time to load the model and run every bucket once (capturing CUDA graphs).",
    ["model"],
)
