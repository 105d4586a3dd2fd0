"""Dynamic batching: request-to-result mapping, delay, priorities, deadlines, bounds."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from engine import (
    Engine,
    EngineNotRunning,
    EngineOverloaded,
    InferenceFailed,
    InferenceTimeout,
    ModelSpec,
)
from tests.engine.onnx_models import metric, serving
from tests.waiting import wait_until


def queued_rows(engine: Engine, model_name: str) -> int:
    """Rows waiting in the model's batcher (queued, not yet handed to its worker)."""
    return engine._batchers[model_name].queued_rows()


async def test_256_concurrent_callers_get_their_own_rows(two_inputs_path: Path) -> None:
    spec = ModelSpec(
        "mixed",
        two_inputs_path,
        buckets=(1, 2, 4, 8, 16, 32),
        max_queue_delay_s=0,
        queue_limit=4096,
    )
    rng = np.random.default_rng(5)

    async def caller(caller_id: int) -> None:
        for turn in range(4):
            rows = int(rng.integers(1, 9))
            a = np.full((rows, 4), caller_id, np.float32)
            a[:, 1] = turn
            a[:, 2] = np.arange(rows)
            b = np.tile(np.array([[caller_id, turn]], np.int64), (rows, 1))
            out = await engine.infer("mixed", {"a": a, "b": b})
            assert out["doubled"].shape == (rows, 4)
            np.testing.assert_array_equal(out["doubled"], a * 2)
            np.testing.assert_array_equal(out["b_float"], b.astype(np.float32))

    async with serving(spec) as engine:
        await asyncio.gather(*(caller(i) for i in range(256)))
    assert metric("gatewayd_engine_requests_total", model="mixed") >= 1024
    # Batching happened: far fewer runs than requests.
    assert metric("gatewayd_engine_batch_rows_count", model="mixed") < 512


async def test_batch_waits_for_max_queue_delay_then_runs(mlp_path: Path, model_name: str) -> None:
    spec = ModelSpec(
        model_name, mlp_path, buckets=(1, 2, 4, 8), max_queue_delay_s=0.3, adaptive_batching=False
    )
    async with serving(spec) as engine:
        x = np.zeros((1, 8), np.float32)
        started = time.perf_counter()
        first = asyncio.ensure_future(engine.infer(model_name, x))
        await wait_until(lambda: queued_rows(engine, model_name) == 1, 5, "the first request")
        second = asyncio.ensure_future(engine.infer(model_name, x))
        await asyncio.gather(first, second)
        waited = time.perf_counter() - started
    assert 0.29 <= waited < 2.0
    # Both requests, the second submitted after the first was queued, shared one batch.
    assert metric("gatewayd_engine_batch_rows_count", model=model_name) == 1
    assert metric("gatewayd_engine_batch_rows_sum", model=model_name) == 2


async def test_full_bucket_runs_without_waiting(mlp_path: Path, model_name: str) -> None:
    spec = ModelSpec(
        model_name, mlp_path, buckets=(1, 2, 4), max_queue_delay_s=30.0, adaptive_batching=False
    )
    async with serving(spec) as engine:
        x = np.zeros((1, 8), np.float32)
        started = time.perf_counter()
        first = asyncio.ensure_future(engine.infer(model_name, x))
        await wait_until(lambda: queued_rows(engine, model_name) == 1, 5, "the first request")
        rest = [engine.infer(model_name, x) for _ in range(3)]  # fills the largest bucket
        await asyncio.gather(first, *rest)
        assert time.perf_counter() - started < 5.0


async def test_queued_request_times_out_and_never_runs(mlp_path: Path, model_name: str) -> None:
    # A long queue delay keeps the lone request waiting past its own deadline.
    spec = ModelSpec(
        model_name, mlp_path, buckets=(1, 2, 4), max_queue_delay_s=30.0, adaptive_batching=False
    )
    async with serving(spec) as engine:
        started = time.perf_counter()
        with pytest.raises(InferenceTimeout, match="not run"):
            await engine.infer(model_name, np.zeros((1, 8), np.float32), timeout_s=0.05)
        assert 0.04 <= time.perf_counter() - started < 2.0
        assert engine._batchers[model_name].queued_rows() == 0
    assert metric("gatewayd_engine_timed_out_total", model=model_name) == 1
    assert metric("gatewayd_engine_batch_rows_count", model=model_name) == 0


async def test_requests_behind_a_slow_batch_time_out(slow_path: Path, model_name: str) -> None:
    # One full batch of the slow model takes tens of ms; the second request allows 1 ms.
    spec = ModelSpec(model_name, slow_path, buckets=(16,), max_queue_delay_s=0)
    async with serving(spec) as engine:
        x = np.ones((16, 4), np.float32)
        running = asyncio.ensure_future(engine.infer(model_name, x))
        # Polled every loop turn: the slow batch lasts only tens of ms.
        await wait_until(
            lambda: engine._batchers[model_name]._busy, 5, "the worker to take the batch", poll_s=0
        )
        with pytest.raises(InferenceTimeout):
            await engine.infer(model_name, x[:1], timeout_s=0.001)
        assert (await running)["y"].shape == (16,)
    assert metric("gatewayd_engine_batch_rows_count", model=model_name) == 1


async def test_overload_rejects_beyond_queue_limit(mlp_path: Path, model_name: str) -> None:
    spec = ModelSpec(model_name, mlp_path, buckets=(1, 2), queue_limit=4, max_queue_delay_s=0)
    async with serving(spec) as engine:
        x = np.zeros((2, 8), np.float32)
        # Created in one loop turn: all three submit before the first dispatch can run.
        results = await asyncio.gather(
            *(engine.infer(model_name, x) for _ in range(3)), return_exceptions=True
        )
        overloaded = [r for r in results if isinstance(r, EngineOverloaded)]
        assert len(overloaded) == 1
        assert "queue full (4 of 4 rows waiting, request has 2)" in str(overloaded[0])
        served = [r for r in results if isinstance(r, dict)]
        assert len(served) == 2
        # After the queue drains the model serves again.
        assert (await engine.infer(model_name, x))["logits"].shape == (2, 3)
    assert metric("gatewayd_engine_rejected_total", model=model_name, reason="overloaded") == 1


async def test_higher_priority_runs_first(mlp_path: Path, model_name: str) -> None:
    spec = ModelSpec(model_name, mlp_path, buckets=(1,), priority_levels=3, max_queue_delay_s=0)
    order: list[str] = []
    async with serving(spec) as engine:
        x = np.zeros((1, 8), np.float32)

        async def call(label: str, priority: int) -> None:
            await engine.infer(model_name, x, priority=priority)
            order.append(label)

        # All queued in one loop turn, before the first dispatch; one row per batch.
        await asyncio.gather(
            call("low-1", 0), call("mid-1", 1), call("high-1", 2), call("low-2", 0),
            call("high-2", 2), call("mid-2", 1),
        )  # fmt: skip
    assert order == ["high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2"]


async def test_failed_run_fails_its_batch_and_keeps_serving(lookup_path: Path) -> None:
    spec = ModelSpec("lookup", lookup_path, buckets=(1, 2, 4), max_queue_delay_s=0)
    async with serving(spec) as engine:
        with pytest.raises(InferenceFailed, match="onnxruntime run failed"):
            await engine.infer("lookup", np.array([99], np.int64))
        out = await engine.infer("lookup", np.array([3, 1], np.int64))
        np.testing.assert_array_equal(out["value"], [[6.0, 7.0], [2.0, 3.0]])
    assert metric("gatewayd_engine_failed_total", model="lookup") == 1


async def test_cancelled_caller_is_dropped_from_the_queue(mlp_path: Path, model_name: str) -> None:
    spec = ModelSpec(
        model_name, mlp_path, buckets=(1, 2, 4), max_queue_delay_s=0.5, adaptive_batching=False
    )
    async with serving(spec) as engine:
        x = np.zeros((1, 8), np.float32)
        cancelled = asyncio.ensure_future(engine.infer(model_name, x))
        kept = asyncio.ensure_future(engine.infer(model_name, x))
        await wait_until(lambda: queued_rows(engine, model_name) == 2, 5, "both requests")
        cancelled.cancel()
        assert (await kept)["logits"].shape == (1, 3)
    assert metric("gatewayd_engine_batch_rows_sum", model=model_name) == 1


async def test_close_finishes_queued_requests_then_refuses(mlp_path: Path, model_name: str) -> None:
    spec = ModelSpec(
        model_name, mlp_path, buckets=(1, 2, 4), max_queue_delay_s=10.0, adaptive_batching=False
    )
    async with serving(spec) as engine:
        x = np.zeros((1, 8), np.float32)
        pending = asyncio.ensure_future(engine.infer(model_name, x))
        await wait_until(lambda: queued_rows(engine, model_name) == 1, 5, "the request")
        started = time.perf_counter()
        await engine.close()
        assert time.perf_counter() - started < 5.0  # close does not wait out the delay
        assert (await pending)["logits"].shape == (1, 3)
        assert not engine.ready
        with pytest.raises(EngineNotRunning):
            await engine.infer(model_name, x)


async def test_one_row_callers_of_a_two_output_model_get_their_own_rows(
    two_inputs_path: Path,
) -> None:
    # One row per request takes the runner's row-view scatter; every caller sees its own row.
    spec = ModelSpec("rows", two_inputs_path, buckets=(1, 8, 32), max_queue_delay_s=0)
    async with serving(spec) as engine:

        async def caller(caller_id: int) -> None:
            a = np.full((1, 4), caller_id, np.float32)
            b = np.array([[caller_id, -caller_id]], np.int64)
            out = await engine.infer("rows", {"a": a, "b": b})
            np.testing.assert_array_equal(out["doubled"], a * 2)
            np.testing.assert_array_equal(out["b_float"], b.astype(np.float32))

        await asyncio.gather(*(caller(i) for i in range(64)))
    assert metric("gatewayd_engine_batch_rows_count", model="rows") < 64


async def test_adaptive_lone_request_runs_without_waiting_for_the_delay(
    mlp_path: Path, model_name: str
) -> None:
    # Nothing else queued or running: the batch cannot grow, so the 30 s delay never applies.
    spec = ModelSpec(model_name, mlp_path, buckets=(1, 2, 4), max_queue_delay_s=30.0)
    async with serving(spec) as engine:
        x = np.zeros((1, 8), np.float32)
        started = time.perf_counter()
        for _ in range(3):
            assert (await engine.infer(model_name, x))["logits"].shape == (1, 3)
        assert time.perf_counter() - started < 5.0
    assert metric("gatewayd_engine_batch_rows_count", model=model_name) == 3


async def test_adaptive_burst_and_requests_behind_a_running_batch_share_batches(
    slow_path: Path, model_name: str
) -> None:
    spec = ModelSpec(model_name, slow_path, buckets=(1, 2, 4, 16), max_queue_delay_s=30.0)
    async with serving(spec) as engine:
        x = np.ones((1, 4), np.float32)
        # Submitted in one loop iteration: one batch, dispatched without waiting 30 s.
        started = time.perf_counter()
        await asyncio.gather(*(engine.infer(model_name, x) for _ in range(3)))
        # The worker records a batch's metrics just after handing its results back.
        await wait_until(
            lambda: metric("gatewayd_engine_batch_rows_count", model=model_name) >= 1,
            5,
            "the batch's metrics",
        )
        assert metric("gatewayd_engine_batch_rows_count", model=model_name) == 1
        # Requests arriving while a batch runs queue and leave together once it ends.
        running = asyncio.ensure_future(engine.infer(model_name, np.ones((16, 4), np.float32)))
        await wait_until(
            lambda: engine._batchers[model_name]._busy, 5, "the worker to take the batch", poll_s=0
        )
        behind = [asyncio.ensure_future(engine.infer(model_name, x)) for _ in range(3)]
        await asyncio.gather(running, *behind)
        assert time.perf_counter() - started < 10.0
    assert metric("gatewayd_engine_batch_rows_count", model=model_name) == 3
    assert metric("gatewayd_engine_batch_rows_sum", model=model_name) == 3 + 16 + 3
