"""Real ONNX models built with onnx.helper for the engine tests, and helpers to serve them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

from engine import Engine, ModelSpec

OPSET = 17


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_mlp(path: Path, features: int = 8, hidden: int = 16, classes: int = 3) -> Path:
    """x float32[N, features] -> logits float32[N, classes], total float32[N]."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(features, hidden)).astype(np.float32)
    b1 = rng.normal(size=(hidden,)).astype(np.float32)
    w2 = rng.normal(size=(hidden, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["logits"]),
            helper.make_node("ReduceSum", ["logits", "axes"], ["total"], keepdims=0),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"]),
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    return save(graph, path)


def build_two_inputs(path: Path) -> Path:
    """a float32[N, 4], b int64[N, 2] -> doubled float32[N, 4], b_float float32[N, 2]."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "a"], ["doubled"]),
            helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b_float", TensorProto.FLOAT, ["N", 2]),
        ],
    )
    return save(graph, path)


def build_lookup(path: Path, table_rows: int = 10) -> Path:
    """index int64[N] -> value float32[N, 2]; an index out of range makes the run fail."""
    table = np.arange(table_rows * 2, dtype=np.float32).reshape(table_rows, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(table, "table")],
    )
    return save(graph, path)


def build_fixed_batch(path: Path) -> Path:
    """An input with a fixed batch dimension of 1: the engine cannot batch it."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return save(graph, path)


def build_slow(path: Path, layers: int = 8, width: int = 256) -> Path:
    """x float32[N, 4] -> y float32[N]: each row expands to a width x width matrix pushed
    through `layers` matmuls, so one run takes milliseconds (keeps the worker busy)."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "spread"], ["row"]),  # [N, width]
        helper.make_node("Unsqueeze", ["row", "axis1"], ["row3"]),  # [N, 1, width]
        helper.make_node("Tile", ["row3", "repeats"], ["h0"]),  # [N, width, width]
    ]
    initializers = [
        numpy_helper.from_array(rng.normal(size=(4, width)).astype(np.float32), "spread"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, width, 1], dtype=np.int64), "repeats"),
    ]
    for i in range(layers):
        weight = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{layers}"], ["y"], axes=[1, 2], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        initializers,
    )
    return save(graph, path)


@contextlib.asynccontextmanager
async def serving(*specs: ModelSpec) -> AsyncIterator[Engine]:
    engine = Engine(list(specs))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def metric(name: str, **labels: str) -> float:
    """Current value of a sample in the default registry (0 when never observed)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def build_spin(path: Path, iterations: int | None = None) -> Path:
    """x float32[N, 1] -> y = x, after a Loop of `iterations` empty steps, or of max(x) steps
    when `iterations` is None (the warm-up's zeros: none). One step takes about a microsecond,
    so 1e9 steps keep the worker busy for good; only `RunOptions.terminate` ends such a run."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
        ],
        "spin_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    initializers = [numpy_helper.from_array(np.array(True), "true")]
    nodes = []
    if iterations is None:
        nodes += [
            helper.make_node("ReduceMax", ["x"], ["x_max"], keepdims=0),
            helper.make_node("Cast", ["x_max"], ["trips"], to=TensorProto.INT64),
        ]
    else:
        initializers.append(numpy_helper.from_array(np.array(iterations, np.int64), "trips"))
    nodes.append(helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body))
    graph = helper.make_graph(
        nodes,
        "spin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        initializers,
    )
    return save(graph, path)
