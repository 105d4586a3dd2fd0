"""`Engine`: serves several ONNX models, each behind its own dynamic batcher.

engine = Engine([ModelSpec("anomaly", Path("engine/models/anomaly.onnx"))])
await engine.start()                       # loads, picks providers, warms every bucket
out = await engine.infer("anomaly", {"window": windows})   # windows: float32[N, 32]
scores = out["score"]                      # float32[N]: exactly the request's rows
await engine.close()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.batcher import Batcher
from engine.errors import EngineNotRunning, UnknownModel
from engine.io import TensorSpec
from engine.runner import split_rows
from engine.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine chose for a loaded model (for status pages and logs)."""

    name: str
    provider: str  # "tensorrt", "cuda" or "cpu"
    cuda_graphs: bool  # one CUDA graph captured per bucket
    buckets: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    warmup_s: float  # load + provider choice + one run per bucket


class Engine:
    """Batched inference for the models in `specs` (names must be unique)."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"engine: model names must be unique, repeated: {duplicates}")
        self._specs = list(specs)
        self._batchers: dict[str, Batcher] = {}
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once every model is loaded and warm, until `close()` begins."""
        return self._ready

    def model_names(self) -> list[str]:
        """Names of the configured models, in configuration order."""
        return [spec.name for spec in self._specs]

    def model_info(self, model: str) -> ModelInfo:
        """Provider, buckets, inputs/outputs and warm-up time of a started model."""
        batcher = self._batcher(model)
        runner = batcher.runner
        if runner is None:
            raise EngineNotRunning(f"model {model!r} is not loaded yet")
        return ModelInfo(
            name=model,
            provider=runner.provider,
            cuda_graphs=runner.cuda_graphs,
            buckets=batcher.spec.buckets,
            inputs=runner.inputs,
            outputs=runner.outputs,
            warmup_s=batcher.warmup_s,
        )

    async def start(self) -> None:
        """Load every model, choose its provider, warm (and capture) every bucket.

        Raises `ModelLoadError` naming the model and file if one cannot be loaded; models
        already started are closed again.
        """
        if self._batchers:
            raise RuntimeError("engine: start() called twice")
        try:
            for spec in self._specs:
                batcher = Batcher(spec)
                self._batchers[spec.name] = batcher
                await batcher.start()
                info = self.model_info(spec.name)
                log.info(
                    "engine: model %r ready on %s (cuda graphs %s), buckets %s warm in %.2f s",
                    spec.name,
                    info.provider,
                    "on" if info.cuda_graphs else "off",
                    list(spec.buckets),
                    info.warmup_s,
                )
        except BaseException:
            await self.close()
            raise
        self._ready = True

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | np.ndarray,
        *,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run `inputs` (1+ rows on axis 0) through `model`; outputs for exactly those rows.

        `inputs` maps input names to arrays, or is one array for a single-input model.
        Higher `priority` runs first. `timeout_s` (default: the model's request_timeout_s)
        bounds the time until the request's batch starts.

        Raises `UnknownModel`, `InvalidInput`, `EngineOverloaded`, `InferenceTimeout`,
        `InferenceFailed` or `EngineNotRunning` (all `EngineError`).
        """
        batcher = self._batchers.get(model)
        if batcher is None:
            raise UnknownModel(self._unknown(model))
        return await batcher.submit(inputs, priority, timeout_s)

    async def infer_many(
        self,
        model: str,
        requests: Sequence[Mapping[str, np.ndarray] | np.ndarray],
        *,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Run several requests of one caller (each as for `infer`); their outputs, in order.

        For a caller with many requests at once (an agent scoring a window of readings): the
        requests are packed in order into queue entries of up to the largest bucket's rows, so
        the engine handles a few entries and wakes this task once per batch instead of once
        per request; together they may carry more rows than the largest bucket. All of them
        share `priority` and the deadline `timeout_s` (to the start of each entry's batch).
        All or nothing: invalid input (`InvalidInput` names the request's index) or a full
        queue rejects the call before anything is queued; if one entry times out or fails,
        the call raises that error and the entries still queued are dropped.
        """
        batcher = self._batchers.get(model)
        if batcher is None:
            raise UnknownModel(self._unknown(model))
        entries = batcher.submit_many(requests, priority, timeout_s)
        results: list[dict[str, np.ndarray]] = []
        try:
            for future, row_counts in entries:
                outputs = await future
                if len(row_counts) == 1:
                    results.append(outputs)
                else:
                    results.extend(split_rows(outputs, row_counts))
        except BaseException:
            for future, _ in entries:
                future.cancel()  # dropped from the queue (a running one completes unseen)
            raise
        return results

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting requests, finish (or time out) queued ones, stop the workers; with
        `timeout_s`, within that time (see `Batcher.close`)."""
        self._ready = False
        await asyncio.gather(*(b.close(timeout_s) for b in self._batchers.values()))

    def _batcher(self, model: str) -> Batcher:
        batcher = self._batchers.get(model)
        if batcher is None:
            if model in self.model_names():
                raise EngineNotRunning(f"model {model!r} is not loaded yet (call start())")
            raise UnknownModel(self._unknown(model))
        return batcher

    def _unknown(self, model: str) -> str:
        if model in self.model_names():
            return f"model {model!r} is not loaded yet (call start())"
        return f"unknown model {model!r}; configured models: {', '.join(self.model_names())}"
