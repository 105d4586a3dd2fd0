"""`ModelSpec`: the settings of one served model, validated on construction.

Plain types only (seconds as float, counts as int) so the daemon's TOML layer can build it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

PROVIDER_NAMES = ("tensorrt", "cuda", "cpu")
MAX_PRIORITY_LEVELS = 64
_INLINE_LIMIT_S = 0.01  # an inline run blocks the event loop: never allow long ones
LONE_INLINE_MAX_RUN_S = 0.0005  # inline_lone_requests: the bucket's recent runs at most this


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """How to load and batch one ONNX model.

    Attributes:
        name: the name callers pass to `Engine.infer`.
        path: the `.onnx` file. Every input must have a dynamic axis 0 (the batch axis) and
            fixed other axes; outputs carry the batch on axis 0 too.
        providers: execution providers in preference order, from "tensorrt", "cuda", "cpu".
            Unavailable ones are skipped with a log line; CPU is the last resort.
        buckets: the batch sizes sessions are run at, strictly increasing. A batch is padded
            to the smallest bucket that fits; a request with more rows than the largest bucket
            is rejected (`InvalidInput`). On CUDA one graph is captured per bucket.
        max_queue_delay_s: how long the oldest queued request may wait for the batch to fill
            to the largest bucket while the model is idle. 0 = run as soon as the worker is
            free, batching whatever queued meanwhile (lowest latency).
        adaptive_batching: True (default): a partial batch waits only while it can still grow
            (rows keep arriving, up to `max_queue_delay_s` after the oldest): a lone request
            on an idle model runs at once. False: a partial batch always waits
            `max_queue_delay_s` for more rows (throughput over latency).
        queue_limit: the most *rows* that may be queued (not yet running) for this model;
            a request that would exceed it fails at once with `EngineOverloaded`.
        priority_levels: requests take priorities 0 .. priority_levels-1; higher runs first,
            FIFO within a level.
        request_timeout_s: default deadline of a request from `infer()` to the start of its
            batch; a request still queued at its deadline fails with `InferenceTimeout`.
        intra_op_threads: ONNX Runtime intra-op threads per session (0 = ORT's default).
        trt_fp16: let TensorRT use fp16 kernels (faster, slightly different numerics).
        cache_dir: where TensorRT keeps its engine and timing caches (None: rebuild at every
            start, which can take minutes).
        cuda_graphs: capture one CUDA graph per bucket when running on CUDA or TensorRT.
        inline_max_run_s: 0 (default): every batch runs on the model's worker thread. > 0
            (CPU provider only): while the worker is idle, a batch whose bucket's recent runs
            took at most this long runs on the event loop's thread instead, saving the two
            thread hops (tens of microseconds each) that dominate a fast model's latency at
            low concurrency; the loop is blocked for that run. Only for models whose run time
            does not depend on the input values (no Loop or If nodes): a run that never ends
            on the loop's thread cannot be stopped by `Engine.close(timeout_s)`.
        inline_lone_requests: True (default, CPU provider only): a lone request (nothing else
            queued, the worker idle) whose bucket's recent runs took at most
            max(inline_max_run_s, 0.5 ms) runs on the event loop's thread: no thread hop
            either way, which is most of a fast model's latency at concurrency 1. Applied
            only to graphs of standard operators without control flow (no Loop/If/Scan, no
            custom domains), read from the model file at load; turn it off for a model
            whose run time still depends on the input values (say, a Range or Tile sized
            by an input), since a run on the loop's thread blocks the loop.
    """

    name: str
    path: Path
    providers: tuple[str, ...] = ("cpu",)
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    max_queue_delay_s: float = 0.002
    adaptive_batching: bool = True
    queue_limit: int = 1024
    priority_levels: int = 4
    request_timeout_s: float = 1.0
    intra_op_threads: int = 1
    trt_fp16: bool = True
    cache_dir: Path | None = None
    cuda_graphs: bool = True
    inline_max_run_s: float = 0.0
    inline_lone_requests: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model name must be a non-empty string, got {self.name!r}")
        where = f"model {self.name!r}"
        # Accept str/list from a config layer but store the declared types.
        if isinstance(self.path, str):
            object.__setattr__(self, "path", Path(self.path))
        if not isinstance(self.path, Path):
            raise ValueError(f"{where}: path must be a path, got {self.path!r}")
        if isinstance(self.cache_dir, str):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            raise ValueError(f"{where}: cache_dir must be a path or None, got {self.cache_dir!r}")
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "buckets", tuple(self.buckets))
        self._validate_providers(where)
        self._validate_buckets(where)
        _require_number(where, "max_queue_delay_s", self.max_queue_delay_s, minimum=0.0)
        _require_number(where, "request_timeout_s", self.request_timeout_s, minimum=0.0)
        _require_number(where, "inline_max_run_s", self.inline_max_run_s, minimum=0.0)
        if self.inline_max_run_s > _INLINE_LIMIT_S:
            raise ValueError(
                f"{where}: inline_max_run_s must be at most {_INLINE_LIMIT_S} s (it blocks the "
                f"event loop for that long), got {self.inline_max_run_s!r}"
            )
        if self.request_timeout_s == 0:
            raise ValueError(f"{where}: request_timeout_s must be > 0")
        _require_int(where, "queue_limit", self.queue_limit, minimum=1)
        if self.queue_limit < self.buckets[-1]:
            raise ValueError(
                f"{where}: queue_limit ({self.queue_limit} rows) must be at least the largest "
                f"bucket ({self.buckets[-1]}), or batches could never fill"
            )
        _require_int(where, "priority_levels", self.priority_levels, minimum=1)
        if self.priority_levels > MAX_PRIORITY_LEVELS:
            raise ValueError(
                f"{where}: priority_levels must be at most {MAX_PRIORITY_LEVELS}, "
                f"got {self.priority_levels}"
            )
        _require_int(where, "intra_op_threads", self.intra_op_threads, minimum=0)
        for flag in ("trt_fp16", "cuda_graphs", "adaptive_batching", "inline_lone_requests"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{where}: {flag} must be true or false")

    def _validate_providers(self, where: str) -> None:
        if not self.providers:
            raise ValueError(f"{where}: providers must list at least one of {PROVIDER_NAMES}")
        for provider in self.providers:
            if provider not in PROVIDER_NAMES:
                raise ValueError(
                    f"{where}: unknown provider {provider!r}; expected some of {PROVIDER_NAMES}"
                )
        if len(set(self.providers)) != len(self.providers):
            raise ValueError(f"{where}: providers lists a provider twice: {self.providers}")

    def _validate_buckets(self, where: str) -> None:
        buckets = self.buckets
        if not buckets:
            raise ValueError(f"{where}: buckets must list at least one batch size")
        for size in buckets:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{where}: buckets must be positive integers, got {buckets}")
        if any(a >= b for a, b in itertools.pairwise(buckets)):
            raise ValueError(f"{where}: buckets must be strictly increasing, got {buckets}")

    @property
    def max_batch_rows(self) -> int:
        """The largest bucket: the most rows one request (and one batch) may carry."""
        return self.buckets[-1]


def _require_number(where: str, field: str, value: object, *, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {field} must be a finite number of seconds, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {field} must be >= {minimum}, got {value!r}")


def _require_int(where: str, field: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {field} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {field} must be >= {minimum}, got {value}")
