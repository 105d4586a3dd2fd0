from pathlib import Path

import numpy as np
import pytest

from engine import Engine, EngineError, EngineNotRunning, ModelSpec, UnknownModel
from tests.engine.onnx_models import serving


async def test_two_models_served_side_by_side(mlp_path: Path, two_inputs_path: Path) -> None:
    specs = (ModelSpec("mlp", mlp_path), ModelSpec("two", two_inputs_path))
    async with serving(*specs) as engine:
        assert engine.ready
        assert engine.model_names() == ["mlp", "two"]
        out = await engine.infer("mlp", np.zeros((1, 8), np.float32))
        assert set(out) == {"logits", "total"}
        info = engine.model_info("two")
        assert [s.name for s in info.inputs] == ["a", "b"]
        assert info.buckets == (1, 2, 4, 8, 16, 32, 64)


async def test_unknown_model(mlp_path: Path) -> None:
    async with serving(ModelSpec("mlp", mlp_path)) as engine:
        with pytest.raises(UnknownModel, match="unknown model 'nope'; configured models: mlp"):
            await engine.infer("nope", np.zeros((1, 8), np.float32))


async def test_infer_before_start(mlp_path: Path) -> None:
    engine = Engine([ModelSpec("mlp", mlp_path)])
    assert not engine.ready
    with pytest.raises(EngineError, match="not loaded yet"):
        await engine.infer("mlp", np.zeros((1, 8), np.float32))
    with pytest.raises(EngineNotRunning):
        engine.model_info("mlp")


def test_duplicate_model_names_rejected(mlp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeated"):
        Engine([ModelSpec("a", mlp_path), ModelSpec("a", mlp_path)])


def test_engine_never_imports_gatewayd_or_protocols() -> None:
    import ast

    package = Path(__file__).resolve().parents[2] / "engine"
    for source in package.rglob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"gatewayd", "protocols"}, f"{source}: {name}"
