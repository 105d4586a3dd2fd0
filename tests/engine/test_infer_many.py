"""`Engine.infer_many`: several requests of one caller, packed into few queue entries."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from engine import EngineOverloaded, InferenceTimeout, InvalidInput, ModelSpec
from tests.engine.onnx_models import metric, serving
from tests.waiting import wait_until


def _request(caller: int, index: int, rows: int) -> dict[str, np.ndarray]:
    a = np.full((rows, 4), caller, np.float32)
    a[:, 1] = index
    a[:, 2] = np.arange(rows)
    return {"a": a, "b": np.tile(np.array([[caller, index]], np.int64), (rows, 1))}


async def test_each_request_gets_its_own_rows_in_order(two_inputs_path: Path) -> None:
    # 8 callers x 30 requests of 1-5 rows (~90 rows a call, more than the largest bucket),
    # beside plain infer() callers: every request gets exactly its rows back.
    spec = ModelSpec("many", two_inputs_path, buckets=(1, 2, 4, 8, 16), queue_limit=4096)
    rng = np.random.default_rng(11)

    async def many_caller(caller: int) -> None:
        for _ in range(3):
            requests = [_request(caller, i, int(rng.integers(1, 6))) for i in range(30)]
            results = await engine.infer_many("many", requests)
            assert len(results) == len(requests)
            for request, result in zip(requests, results, strict=True):
                np.testing.assert_array_equal(result["doubled"], request["a"] * 2)
                np.testing.assert_array_equal(result["b_float"], request["b"].astype(np.float32))

    async def single_caller(caller: int) -> None:
        for i in range(5):
            request = _request(caller, i, 1)
            out = await engine.infer("many", request)
            np.testing.assert_array_equal(out["doubled"], request["a"] * 2)

    async with serving(spec) as engine:
        assert await engine.infer_many("many", []) == []
        await asyncio.gather(
            *(many_caller(c) for c in range(8)), *(single_caller(100 + c) for c in range(16))
        )
    # Every request counts, however packed: 8 x 3 calls of 30 requests, 80 single requests.
    assert metric("gatewayd_engine_requests_total", model="many") == 8 * 3 * 30 + 80


async def test_one_row_requests_fill_whole_buckets(mlp_path: Path, model_name: str) -> None:
    spec = ModelSpec(model_name, mlp_path, buckets=(1, 8, 32), max_queue_delay_s=0)
    rows = np.random.default_rng(3).normal(size=(100, 8)).astype(np.float32)
    async with serving(spec) as engine:
        single = await engine.infer(model_name, rows[:1])  # one batch on its own
        results = await engine.infer_many(model_name, [row[None] for row in rows])
        whole = [await engine.infer(model_name, rows[i : i + 32]) for i in range(0, 100, 32)]
    expected = np.concatenate([w["logits"] for w in whole])
    np.testing.assert_allclose(results[0]["logits"], single["logits"], rtol=1e-6)
    for index, result in enumerate(results):
        assert result["logits"].shape == (1, 3)
        assert result["total"].shape == (1,)
        np.testing.assert_allclose(result["logits"][0], expected[index], rtol=1e-5, atol=1e-6)
    assert metric("gatewayd_engine_requests_total", model=model_name) == 1 + 100 + 4
    # 100 rows packed into entries of 32 + 32 + 32 + 4 rows, one batch each, like the 4
    # infer() calls of the same rows; and the single request.
    assert metric("gatewayd_engine_batch_rows_count", model=model_name) == 1 + 4 + 4


async def test_bad_request_rejects_the_whole_call_and_names_it(two_inputs_path: Path) -> None:
    spec = ModelSpec("many_bad", two_inputs_path, buckets=(1, 8))
    good = _request(1, 0, 2)
    bad = {"a": np.zeros((1, 5), np.float32), "b": np.zeros((1, 2), np.int64)}
    async with serving(spec) as engine:
        with pytest.raises(InvalidInput) as caught:
            await engine.infer_many("many_bad", [good, good, bad, good])
        assert str(caught.value).startswith("requests[2]: model 'many_bad': input 'a' expected")
        with pytest.raises(InvalidInput, match=r"takes a list of requests.*got ndarray"):
            await engine.infer_many("many_bad", np.zeros((3, 4), np.float32))  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=r"takes a list of requests.*got dict"):
            await engine.infer_many("many_bad", good)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=r"priority must be an integer 0\.\.3, got 7"):
            await engine.infer_many("many_bad", [good], priority=7)
        # Nothing of the rejected calls was queued or run; the model keeps serving.
        assert engine._batchers["many_bad"].queued_rows() == 0
        assert metric("gatewayd_engine_batch_rows_count", model="many_bad") == 0
        out = await engine.infer_many("many_bad", [good])
        np.testing.assert_array_equal(out[0]["doubled"], good["a"] * 2)
    assert metric("gatewayd_engine_rejected_total", model="many_bad", reason="invalid_input") == 4


async def test_queue_limit_is_all_or_nothing(slow_path: Path, model_name: str) -> None:
    spec = ModelSpec(model_name, slow_path, buckets=(1, 4), queue_limit=8, max_queue_delay_s=0)
    x = np.ones((1, 4), np.float32)
    async with serving(spec) as engine:
        batcher = engine._batchers[model_name]
        running = asyncio.ensure_future(engine.infer(model_name, np.ones((4, 4), np.float32)))
        await wait_until(lambda: batcher._busy, 5, "the worker to take the batch", poll_s=0)
        # 5 rows: an entry of 4 (staged behind the running batch) and one of 1 (queued).
        queued = asyncio.ensure_future(engine.infer_many(model_name, [x] * 5))
        await wait_until(lambda: batcher.queued_rows() == 1, 5, "the queued entry", poll_s=0)
        with pytest.raises(EngineOverloaded, match=r"\(1 of 8 rows waiting, the requests have 8\)"):
            await engine.infer_many(model_name, [x] * 8)
        assert batcher.queued_rows() == 1  # nothing of the rejected call was queued
        with pytest.raises(InvalidInput, match="9 rows in all, more than the queue holds"):
            await engine.infer_many(model_name, [x] * 9)
        assert len(await queued) == 5
        await running
    assert metric("gatewayd_engine_rejected_total", model=model_name, reason="overloaded") == 1


async def test_timeout_and_cancellation_drop_the_queued_entries(
    slow_path: Path, model_name: str
) -> None:
    spec = ModelSpec(model_name, slow_path, buckets=(1, 4), max_queue_delay_s=0)
    x = np.ones((1, 4), np.float32)
    async with serving(spec) as engine:
        batcher = engine._batchers[model_name]
        running = asyncio.ensure_future(engine.infer(model_name, np.ones((4, 4), np.float32)))
        await wait_until(lambda: batcher._busy, 5, "the worker to take the batch", poll_s=0)
        with pytest.raises(InferenceTimeout, match="not run"):
            await engine.infer_many(model_name, [x] * 10, timeout_s=0.001)
        cancelled = asyncio.ensure_future(engine.infer_many(model_name, [x] * 10, timeout_s=60))
        await wait_until(lambda: batcher.queued_rows() >= 2, 5, "the queued entries", poll_s=0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await running
        # The cancelled call's entries still queued never run; the model keeps serving.
        assert len(await engine.infer_many(model_name, [x] * 3)) == 3
        await wait_until(lambda: batcher.queued_rows() == 0, 5, "an empty queue")
    assert metric("gatewayd_engine_timed_out_total", model=model_name) >= 1
    # At most the one entry staged behind the running batch (4 rows) of the cancelled call ran.
    assert metric("gatewayd_engine_batch_rows_sum", model=model_name) <= 4 + 4 + 3
