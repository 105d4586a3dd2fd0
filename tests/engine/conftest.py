"""Fixtures for the engine tests: real models written to the test's tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.onnx_models import build_lookup, build_mlp, build_slow, build_two_inputs


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    return build_mlp(tmp_path / "mlp.onnx")


@pytest.fixture
def two_inputs_path(tmp_path: Path) -> Path:
    return build_two_inputs(tmp_path / "two_inputs.onnx")


@pytest.fixture
def lookup_path(tmp_path: Path) -> Path:
    return build_lookup(tmp_path / "lookup.onnx")


@pytest.fixture
def slow_path(tmp_path: Path) -> Path:
    return build_slow(tmp_path / "slow.onnx")


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A model name unique to the test, so process-wide metrics start at zero for it."""
    return f"m_{request.node.name}"[:120]
