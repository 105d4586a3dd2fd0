"""Reading a model's operators from its file (for inline runs of lone requests)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from engine.graph_ops import op_types, unbounded_ops
from tests.engine.onnx_models import build_lookup, build_mlp, build_spin, build_two_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("build", [build_mlp, build_spin, build_lookup, build_two_inputs])
def test_ops_equal_what_onnx_reads(tmp_path: Path, build) -> None:  # type: ignore[no-untyped-def]
    path = build(tmp_path / "model.onnx")
    model = onnx.load(str(path))
    assert op_types(path) == {(node.domain, node.op_type) for node in model.graph.node}


def test_committed_example_model_is_bounded() -> None:
    ops = op_types(ROOT / "engine" / "models" / "anomaly.onnx")
    assert ops is not None and ("", "MatMul") in ops
    assert unbounded_ops(ops) == []


def test_control_flow_and_custom_domains_are_named() -> None:
    ops = {("", "MatMul"), ("", "Loop"), ("", "If"), ("com.microsoft", "BeamSearch")}
    assert unbounded_ops(ops) == ["If", "Loop", "com.microsoft:BeamSearch"]
    assert unbounded_ops({("ai.onnx.ml", "TreeEnsembleClassifier"), ("", "Gemm")}) == []


def test_unreadable_files_give_none(tmp_path: Path) -> None:
    good = build_mlp(tmp_path / "good.onnx").read_bytes()
    cases = {
        "missing.onnx": None,
        "empty.onnx": b"",
        "garbage.onnx": b"\xff" * 64,
        "truncated.onnx": good[: len(good) // 2],
        "text.onnx": b"not a model at all",
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        assert op_types(path) is None, name
