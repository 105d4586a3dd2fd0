"""Batches formed while another runs (staged), and inline runs on the event loop's thread."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engine import Engine, InferenceTimeout, ModelSpec
from tests.engine.onnx_models import build_spin, metric, serving
from tests.waiting import wait_until

# About 0.05-0.15 s of Loop steps: long enough for a request to be staged behind it and for a
# 10 ms deadline to pass, short enough to keep the test fast.
BUSY = np.full((1, 1), 1e5, np.float32)
LONG = np.full((1, 1), 3e5, np.float32)  # 0.1-0.5 s: outlasts a 10 ms deadline anywhere


def _batcher(engine: Engine, model: str):  # type: ignore[no-untyped-def]
    return engine._batchers[model]


async def test_staged_request_fails_at_its_deadline_and_never_runs(tmp_path: Path) -> None:
    spec = ModelSpec("spin_staged", build_spin(tmp_path / "spin.onnx"), buckets=(1,))
    async with serving(spec) as engine:
        batcher = _batcher(engine, "spin_staged")
        running = asyncio.ensure_future(engine.infer("spin_staged", LONG, timeout_s=60))
        await wait_until(lambda: batcher._busy, 5, "the worker to take the batch", poll_s=0)
        # The bucket is full at once (1 row) while the worker is busy: the loop stages it.
        late = asyncio.ensure_future(
            engine.infer("spin_staged", np.zeros((1, 1), np.float32), timeout_s=0.01)
        )
        await wait_until(lambda: len(batcher._staged) == 1, 5, "the staged batch", poll_s=0)
        with pytest.raises(InferenceTimeout, match="past its deadline; it was not run"):
            await late
        # At its deadline, not when the run ahead of it ended.
        assert not running.done()
        assert not batcher._staged
        assert (await running)["y"].shape == (1, 1)
        # The model still serves, and the staged request's slot is free again.
        out = await engine.infer("spin_staged", np.full((1, 1), 3.0, np.float32))
        np.testing.assert_array_equal(out["y"], [[3.0]])
    assert metric("gatewayd_engine_timed_out_total", model="spin_staged") == 1
    assert metric("gatewayd_engine_batch_rows_count", model="spin_staged") == 2


async def test_cancelled_staged_caller_does_not_disturb_the_others(tmp_path: Path) -> None:
    spec = ModelSpec("spin_cancel", build_spin(tmp_path / "spin.onnx"), buckets=(1, 2))
    async with serving(spec) as engine:
        batcher = _batcher(engine, "spin_cancel")
        running = asyncio.ensure_future(engine.infer("spin_cancel", BUSY, timeout_s=60))
        await wait_until(lambda: batcher._busy, 5, "the worker to take the batch", poll_s=0)
        one = np.full((1, 1), 1.0, np.float32)
        two = np.full((1, 1), 2.0, np.float32)
        cancelled = asyncio.ensure_future(engine.infer("spin_cancel", one, timeout_s=60))
        kept = asyncio.ensure_future(engine.infer("spin_cancel", two, timeout_s=60))
        await wait_until(lambda: len(batcher._staged) == 1, 5, "the staged batch", poll_s=0)
        cancelled.cancel()
        np.testing.assert_array_equal((await kept)["y"], [[2.0]])
        await running
        assert cancelled.cancelled()


async def test_pipelined_batches_keep_results_with_their_callers(mlp_path: Path) -> None:
    # 256 callers and 8-row buckets: batches are staged behind the running one all the time.
    raw = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    spec = ModelSpec("piped", mlp_path, buckets=(1, 2, 4, 8), max_queue_delay_s=0)
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(1, 8)).astype(np.float32) for _ in range(256)]
    async with serving(spec) as engine:

        async def caller(x: np.ndarray) -> None:
            for _ in range(3):
                out = await engine.infer("piped", {"x": x})
                np.testing.assert_allclose(out["logits"], raw.run(None, {"x": x})[0], rtol=1e-5)

        await asyncio.gather(*(caller(x) for x in inputs))
    assert metric("gatewayd_engine_batch_rows_count", model="piped") <= 768 / 4


async def test_inline_runs_a_fast_lone_request_on_the_loop_thread(mlp_path: Path) -> None:
    raw = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    spec = ModelSpec("inline", mlp_path, buckets=(1, 2, 4), inline_max_run_s=0.01)
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    async with serving(spec) as engine:
        batcher = _batcher(engine, "inline")
        for _ in range(20):
            out = await engine.infer("inline", x)
            np.testing.assert_allclose(out["logits"], raw.run(None, {"x": x})[0], rtol=1e-5)
        assert not batcher._busy
        # The idle worker is asked to flush the inline runs' metrics. (A first run slower than
        # 10 ms on a very busy machine may go to the worker; the rest run inline.)
        await wait_until(
            lambda: metric("gatewayd_engine_batch_rows_count", model="inline") == 20,
            5,
            "the 20 batches in the metrics",
        )
        assert metric("gatewayd_engine_inline_batches_total", model="inline") >= 15


async def test_inline_is_not_used_for_a_bucket_slower_than_the_limit(slow_path: Path) -> None:
    # Each run of the slow model takes milliseconds: far above the 50 us limit.
    spec = ModelSpec("not_inline", slow_path, buckets=(1, 2), inline_max_run_s=0.00005)
    async with serving(spec) as engine:
        for _ in range(3):
            await engine.infer("not_inline", np.ones((1, 4), np.float32))
    assert metric("gatewayd_engine_inline_batches_total", model="not_inline") == 0
    assert metric("gatewayd_engine_batch_rows_count", model="not_inline") == 3


@pytest.mark.parametrize("value", [-0.001, 0.5, float("nan")])
def test_inline_limit_is_validated(mlp_path: Path, value: float) -> None:
    with pytest.raises(ValueError, match="inline_max_run_s"):
        ModelSpec("bad_inline", mlp_path, inline_max_run_s=value)


async def test_lone_requests_run_inline_by_default(mlp_path: Path) -> None:
    raw = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    spec = ModelSpec("lone", mlp_path, buckets=(1, 2, 4, 8))  # inline_lone_requests defaults on
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    async with serving(spec) as engine:
        for _ in range(20):
            out = await engine.infer("lone", x)
            np.testing.assert_allclose(out["logits"], raw.run(None, {"x": x})[0], rtol=1e-5)
        await wait_until(
            lambda: metric("gatewayd_engine_batch_rows_count", model="lone") == 20,
            5,
            "the 20 batches in the metrics",
        )
        inline = metric("gatewayd_engine_inline_batches_total", model="lone")
        # (A first run slower than 0.5 ms on a very busy machine may go to the worker.)
        assert inline >= 15
        # Requests that arrive together are not lone: their batch goes to the worker.
        await asyncio.gather(*(engine.infer("lone", x) for _ in range(8)))
        await wait_until(
            lambda: metric("gatewayd_engine_batch_rows_count", model="lone") == 21,
            5,
            "the batch's metrics",
        )
    assert metric("gatewayd_engine_inline_batches_total", model="lone") == inline


@pytest.mark.parametrize("control_flow", [True, False])
async def test_lone_requests_stay_on_the_worker_for_control_flow_or_when_off(
    tmp_path: Path, mlp_path: Path, control_flow: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A Loop's step count can come from the input values: never inline by default.
    name = f"lone_{control_flow}"
    if control_flow:
        spec = ModelSpec(name, build_spin(tmp_path / "spin.onnx", iterations=3), buckets=(1,))
        x = np.ones((1, 1), np.float32)
    else:
        spec = ModelSpec(name, mlp_path, buckets=(1,), inline_lone_requests=False)
        x = np.ones((1, 8), np.float32)
    with caplog.at_level("INFO", logger="engine.batcher"):
        async with serving(spec) as engine:
            for _ in range(5):
                await engine.infer(name, x)
    assert metric("gatewayd_engine_inline_batches_total", model=name) == 0
    assert metric("gatewayd_engine_batch_rows_count", model=name) == 5
    logged = "lone requests run on the worker thread, not inline" in caplog.text
    assert logged == control_flow
    if control_flow:
        assert "input values: Loop" in caplog.text
