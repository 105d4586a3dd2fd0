"""Closing the engine never waits forever: a timeout on close, a cancellable warm-up."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine import Engine, EngineNotRunning, InferenceFailed, ModelSpec
from tests.engine.onnx_models import build_spin

pytestmark = pytest.mark.timeout(60)

STUCK = np.full((1, 1), 1e9, np.float32)  # a run of ~1e9 Loop steps: never ends by itself


def _worker(name: str) -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == f"engine-{name}")


async def _wait_until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_close_with_timeout_ends_a_stuck_run_and_fails_queued_requests(
    tmp_path: Path,
) -> None:
    spec = ModelSpec("spin", build_spin(tmp_path / "spin.onnx"), buckets=(1,), max_queue_delay_s=0)
    engine = Engine([spec])
    await engine.start()
    worker = _worker("spin")
    stuck = asyncio.ensure_future(engine.infer("spin", STUCK, timeout_s=60))
    await asyncio.sleep(0)  # dispatched to the worker: the next one queues behind it
    queued = asyncio.ensure_future(engine.infer("spin", np.zeros((1, 1), np.float32)))
    await asyncio.sleep(0)

    await asyncio.wait_for(engine.close(timeout_s=0.5), 10)

    with pytest.raises(InferenceFailed, match="terminate"):
        await asyncio.wait_for(stuck, 10)
    with pytest.raises(EngineNotRunning, match="closed before it ran"):
        await queued
    worker.join(timeout=10)
    assert not worker.is_alive()


async def test_cancelled_start_stops_a_warm_up_that_would_never_end(tmp_path: Path) -> None:
    path = build_spin(tmp_path / "endless.onnx", iterations=10**12)
    engine = Engine([ModelSpec("endless", path, buckets=(1,))])
    starting = asyncio.ensure_future(engine.start())

    def warming() -> bool:
        try:
            engine.model_info("endless")
        except EngineNotRunning:
            return False
        return True

    await _wait_until(warming)  # the session is loaded: the endless warm-up run has begun
    worker = _worker("endless")
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(starting, 10)
    worker.join(timeout=10)
    assert not worker.is_alive()
