"""Bad inputs are refused with a clear InvalidInput before reaching ONNX Runtime."""

from pathlib import Path

import numpy as np
import pytest

from engine import InvalidInput, ModelSpec
from tests.engine.onnx_models import metric, serving


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"c": np.zeros((1, 4), np.float32)}, "expected inputs (a, b), received ('c')"),
        ({"a": np.zeros((1, 4), np.float32)}, "expected inputs (a, b), received ('a')"),
        (
            {"a": np.zeros((1, 4), np.float64), "b": np.zeros((1, 2), np.int64)},
            "input 'a' expected dtype float32, received float64",
        ),
        (
            {"a": np.zeros((1, 5), np.float32), "b": np.zeros((1, 2), np.int64)},
            "input 'a' expected shape a: float32[N, 4] (rows on axis 0), received [1, 5]",
        ),
        (
            {"a": np.zeros((4,), np.float32), "b": np.zeros((1, 2), np.int64)},
            "input 'a' expected shape",
        ),
        (
            {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 2), np.int64)},
            "disagree on the row count",
        ),
        (
            {"a": np.zeros((0, 4), np.float32), "b": np.zeros((0, 2), np.int64)},
            "at least 1 row",
        ),
        (
            {"a": np.zeros((9, 4), np.float32), "b": np.zeros((9, 2), np.int64)},
            "more than the largest bucket (8)",
        ),
        ({"a": [[1.0, 2.0, 3.0, 4.0]], "b": np.zeros((1, 2), np.int64)}, "must be a numpy array"),
        (np.zeros((1, 4), np.float32), "has 2 inputs (a, b); pass a dict"),
        ("a string", "inputs must be a dict"),
    ],
)
async def test_bad_inputs_are_refused_clearly(
    two_inputs_path: Path, model_name: str, inputs: object, message: str
) -> None:
    spec = ModelSpec(model_name, two_inputs_path, buckets=(1, 8))
    async with serving(spec) as engine:
        with pytest.raises(InvalidInput) as caught:
            await engine.infer(model_name, inputs)  # type: ignore[arg-type]
        assert message in str(caught.value)
        assert f"model {model_name!r}" in str(caught.value)
        # Nothing reached onnxruntime, and the model keeps serving good requests.
        assert (
            metric("gatewayd_engine_batches_total", model=model_name, bucket="1", phase="serve")
            == 0
        )
        good = {"a": np.ones((1, 4), np.float32), "b": np.array([[3, 4]], np.int64)}
        out = await engine.infer(model_name, good)
        np.testing.assert_array_equal(out["b_float"], [[3.0, 4.0]])
    assert metric("gatewayd_engine_rejected_total", model=model_name, reason="invalid_input") == 1


async def test_bad_priority_and_timeout(mlp_path: Path, model_name: str) -> None:
    async with serving(ModelSpec(model_name, mlp_path, priority_levels=2)) as engine:
        x = np.zeros((1, 8), np.float32)
        with pytest.raises(InvalidInput, match=r"priority must be an integer 0\.\.1, got 2"):
            await engine.infer(model_name, x, priority=2)
        with pytest.raises(InvalidInput, match="timeout_s must be a positive number"):
            await engine.infer(model_name, x, timeout_s=0)


async def test_single_array_for_single_input_model(mlp_path: Path) -> None:
    async with serving(ModelSpec("single", mlp_path)) as engine:
        out = await engine.infer("single", np.zeros((2, 8), np.float32))
        assert out["logits"].shape == (2, 3)
        assert out["total"].shape == (2,)
