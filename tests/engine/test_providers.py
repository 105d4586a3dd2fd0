import logging
from pathlib import Path

import pytest

from engine import Engine, ModelLoadError, ModelSpec
from tests.engine.onnx_models import build_fixed_batch, serving


async def test_missing_file_names_model_and_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.onnx"
    engine = Engine([ModelSpec("ghost", path)])
    with pytest.raises(ModelLoadError) as caught:
        await engine.start()
    assert "'ghost'" in str(caught.value)
    assert str(path) in str(caught.value)
    assert not engine.ready


async def test_corrupt_file_names_model_and_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf model\xff\xff")
    engine = Engine([ModelSpec("broken", path)])
    with pytest.raises(ModelLoadError) as caught:
        await engine.start()
    assert "'broken'" in str(caught.value)
    assert str(path) in str(caught.value)


async def test_fixed_batch_axis_is_refused(tmp_path: Path) -> None:
    path = build_fixed_batch(tmp_path / "fixed.onnx")
    with pytest.raises(ModelLoadError, match="fixed batch dimension 1"):
        await Engine([ModelSpec("fixed", path)]).start()


async def test_failed_start_closes_models_already_started(mlp_path: Path, tmp_path: Path) -> None:
    engine = Engine([ModelSpec("good", mlp_path), ModelSpec("bad", tmp_path / "nope.onnx")])
    with pytest.raises(ModelLoadError, match="'bad'"):
        await engine.start()
    assert not engine.ready


@pytest.mark.parametrize("providers", [("cuda",), ("tensorrt", "cuda", "cpu")])
async def test_gpu_preference_falls_back_to_cpu_with_a_log_line(
    mlp_path: Path, providers: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback path is not taken")
    caplog.set_level(logging.INFO, logger="engine")
    async with serving(ModelSpec("fallback", mlp_path, providers=providers)) as engine:
        info = engine.model_info("fallback")
        assert info.provider == "cpu"
        assert not info.cuda_graphs
    text = caplog.text
    assert "provider cuda not used: CUDAExecutionProvider is not in this onnxruntime build" in text
    assert "'fallback'" in text


def test_provider_order_from_what_the_build_offers(
    mlp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from engine.providers import _usable_providers

    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cpu_build = ["CPUExecutionProvider"]

    def order(providers: tuple[str, ...], available: list[str]) -> list[str]:
        return _usable_providers(ModelSpec("m", mlp_path, providers=providers), available, "m")

    assert order(("tensorrt", "cuda", "cpu"), gpu_build) == ["tensorrt", "cuda", "cpu"]
    # TensorRT runs on CUDA anyway: if it cannot start, CUDA is tried before CPU.
    assert order(("tensorrt",), gpu_build) == ["tensorrt", "cuda", "cpu"]
    assert order(("cpu", "cuda"), gpu_build) == ["cpu", "cuda"]
    caplog.set_level(logging.WARNING, logger="engine")
    assert order(("tensorrt", "cuda"), cpu_build) == ["cpu"]
    assert "provider tensorrt not used" in caplog.text
    assert "none of the requested providers (tensorrt, cuda) is available" in caplog.text
