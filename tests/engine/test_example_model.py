import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine import ModelSpec
from engine.example_model import ONNX_MISSING, ONNX_REQUIREMENT, main, normal_windows
from tests.engine.onnx_models import serving

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "engine" / "models" / "anomaly.onnx"


def _threshold(path: Path) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(session.get_modelmeta().custom_metadata_map["anomaly_threshold"])


async def test_committed_model_separates_normal_from_anomalous_windows() -> None:
    rng = np.random.default_rng(99)
    normal = normal_windows(512, rng)
    spiked = normal.copy()
    spiked[:, 17] += 2.5  # a spike in one reading
    threshold = _threshold(COMMITTED)
    async with serving(ModelSpec("anomaly", COMMITTED, max_queue_delay_s=0)) as engine:
        normal_scores = np.concatenate(
            [
                (await engine.infer("anomaly", normal[i : i + 64]))["score"]
                for i in range(0, 512, 64)
            ]
        )
        spiked_out = await engine.infer("anomaly", spiked[:64])
    assert (normal_scores > threshold).mean() < 0.02
    assert (spiked_out["score"] > threshold).all()
    assert spiked_out["reconstruction"].shape == (64, 32)


def test_generator_reproduces_the_committed_model(tmp_path: Path) -> None:
    out = tmp_path / "anomaly.onnx"
    main([str(out)])
    windows = normal_windows(100, np.random.default_rng(1))
    fresh = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    committed = ort.InferenceSession(str(COMMITTED), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        fresh.run(["score"], {"window": windows})[0],
        committed.run(["score"], {"window": windows})[0],
        rtol=1e-4,
        atol=1e-6,
    )
    assert abs(_threshold(out) - _threshold(COMMITTED)) < 1e-4 * _threshold(COMMITTED)


def test_without_onnx_the_command_says_exactly_what_to_install(tmp_path: Path) -> None:
    """After a plain `pip install '.[cpu]'` onnx is absent: the command says what to install."""
    out = tmp_path / "anomaly.onnx"
    blocked = (
        "import runpy, sys; sys.modules['onnx'] = None; "  # `import onnx` fails as if not installed
        f"sys.argv = ['example_model', {str(out)!r}]; "
        "runpy.run_module('engine.example_model', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 1
    assert result.stderr.strip() == ONNX_MISSING
    assert f"pip install '{ONNX_REQUIREMENT}'" in ONNX_MISSING
    assert not out.exists()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert ONNX_REQUIREMENT in extras["test"] and ONNX_REQUIREMENT in extras["bench"]
