"""Per-bucket buffers: warm-up of every bucket, exact results, padding never leaks."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine import ModelSpec
from tests.engine.onnx_models import metric, serving

BUCKETS = (1, 2, 4, 8, 16)


async def test_start_runs_every_bucket_once_before_returning(
    mlp_path: Path, model_name: str
) -> None:
    spec = ModelSpec(model_name, mlp_path, buckets=BUCKETS)
    async with serving(spec) as engine:
        assert engine.ready
        for bucket in BUCKETS:
            warm = metric(
                "gatewayd_engine_batches_total",
                model=model_name,
                bucket=str(bucket),
                phase="warmup",
            )
            assert warm == 1, f"bucket {bucket} warmed {warm} times"
            serve = metric(
                "gatewayd_engine_batches_total", model=model_name, bucket=str(bucket), phase="serve"
            )
            assert serve == 0
        assert metric("gatewayd_engine_warmup_seconds", model=model_name) > 0
        assert engine.model_info(model_name).warmup_s > 0


async def test_batched_results_equal_unbatched_runs(mlp_path: Path, model_name: str) -> None:
    raw = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    requests = [rng.normal(size=(int(rng.integers(1, 6)), 8)).astype(np.float32) for _ in range(60)]
    spec = ModelSpec(model_name, mlp_path, buckets=BUCKETS, max_queue_delay_s=0.0)
    async with serving(spec) as engine:
        import asyncio

        results = await asyncio.gather(*(engine.infer(model_name, x) for x in requests))
    for x, result in zip(requests, results, strict=True):
        logits, total = raw.run(None, {"x": x})
        assert result["logits"].shape == logits.shape
        np.testing.assert_allclose(result["logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result["total"], total, rtol=1e-5, atol=1e-5)
    # They really were batched, and into padded buckets.
    batches = metric("gatewayd_engine_batch_rows_count", model=model_name)
    assert batches < len(requests)


async def test_padding_never_leaks_and_results_are_not_reused(
    mlp_path: Path, model_name: str
) -> None:
    raw = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    spec = ModelSpec(model_name, mlp_path, buckets=(4,), max_queue_delay_s=0.0)
    async with serving(spec) as engine:
        big = np.full((4, 8), 9.0, np.float32)
        first = await engine.infer(model_name, big)  # fills all 4 rows of the bucket
        small = np.full((3, 8), -1.0, np.float32)
        second = await engine.infer(model_name, small)  # 1 padding row, stale before zeroing
        assert second["logits"].shape == (3, 3)
        assert second["total"].shape == (3,)
        np.testing.assert_allclose(second["logits"], raw.run(None, {"x": small})[0], rtol=1e-5)
        # The first result was not overwritten when the bucket's buffers were reused.
        np.testing.assert_allclose(first["logits"], raw.run(None, {"x": big})[0], rtol=1e-5)
        # Mutating a result does not affect later results.
        second["logits"][:] = 0
        again = await engine.infer(model_name, small)
        np.testing.assert_allclose(again["logits"], raw.run(None, {"x": small})[0], rtol=1e-5)
    assert metric("gatewayd_engine_padding_rows_total", model=model_name) == 2


async def test_multi_input_rows_scatter_to_their_request(two_inputs_path: Path) -> None:
    import asyncio

    spec = ModelSpec("two", two_inputs_path, buckets=(1, 2, 4, 8), max_queue_delay_s=0.0)
    async with serving(spec) as engine:
        requests = [
            {
                "a": np.full((n, 4), i, np.float32),
                "b": np.tile(np.array([[i, -i]], np.int64), (n, 1)),
            }
            for i, n in enumerate([1, 3, 2, 1, 1, 4, 2])
        ]
        results = await asyncio.gather(*(engine.infer("two", r) for r in requests))
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["doubled"], request["a"] * 2)
        np.testing.assert_array_equal(result["b_float"], request["b"].astype(np.float32))


def test_staged_device_buffer_path_on_cpu(two_inputs_path: Path, mlp_path: Path) -> None:
    """The GPU code path (separate device buffers, update_inplace, copy out) run on CPU."""
    from engine.providers import load_session
    from engine.runner import Runner, split_rows

    spec = ModelSpec("staged", mlp_path, buckets=(2, 8))
    runner = Runner(spec, load_session(spec), staged=True)
    runner.warm_up()
    raw = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    for sizes in ([1], [2, 3], [1, 1, 1, 1, 1, 1, 1, 1], [5]):
        requests = [{"x": rng.normal(size=(n, 8)).astype(np.float32)} for n in sizes]
        outputs = runner.run(requests, sum(sizes))
        results = split_rows(outputs, sizes)
        for request, result in zip(requests, results, strict=True):
            logits, total = raw.run(None, request)
            np.testing.assert_allclose(result["logits"], logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(result["total"], total, rtol=1e-5, atol=1e-5)


async def test_output_shapes_missing_from_metadata_are_probed(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from tests.engine.onnx_models import save

    # A reshape to a shape computed at run time: no static output shape, so the runner
    # learns it from one run.
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one"], ["rows"]),
            helper.make_node("Concat", ["rows", "minus_one"], ["target"], axis=0),
            helper.make_node("Neg", ["x"], ["negated"]),
            helper.make_node("Reshape", ["negated", "target"], ["y"]),
        ],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", "C"])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        ],
    )
    path = save(graph, tmp_path / "probe.onnx")
    async with serving(ModelSpec("probe", path, buckets=(1, 4), max_queue_delay_s=0)) as engine:
        assert engine.model_info("probe").outputs[0].row_shape is None
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal((await engine.infer("probe", x))["y"], -x)
