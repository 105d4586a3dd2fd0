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


def _gpu_usable() -> bool:
    import onnxruntime as ort

    from engine.providers import cuda_driver_present

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_driver_present()


@pytest.mark.parametrize("providers", [("cuda",), ("tensorrt", "cuda", "cpu")])
async def test_gpu_preference_falls_back_to_cpu_with_a_log_line(
    mlp_path: Path, providers: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    if _gpu_usable():
        pytest.skip("this host runs CUDA; the fallback path is not taken")
    caplog.set_level(logging.INFO, logger="engine")
    async with serving(ModelSpec("fallback", mlp_path, providers=providers)) as engine:
        info = engine.model_info("fallback")
        assert info.provider == "cpu"
        assert not info.cuda_graphs
    chosen = [r for r in caplog.records if "using CPUExecutionProvider" in r.getMessage()]
    assert len(chosen) == 1
    text = chosen[0].getMessage()
    assert "'fallback'" in text
    assert "skipped " in text  # why the preferred GPU providers were not used
    assert "cuda" in text.split("skipped ", 1)[1]
    # CPU was not asked for: falling back to it is worth a warning.
    expected = logging.INFO if "cpu" in providers else logging.WARNING
    assert chosen[0].levelno == expected


async def test_cpu_host_chooses_quietly_with_one_info_line(
    mlp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The example config's [models.anomaly] prefers cuda, then cpu: on a host without CUDA
    # that is expected, not a warning.
    if _gpu_usable():
        pytest.skip("this host runs CUDA; the CPU-only path is not taken")
    caplog.set_level(logging.DEBUG, logger="engine")
    async with serving(ModelSpec("quiet", mlp_path, providers=("cuda", "cpu"))):
        pass
    engine_records = [r for r in caplog.records if r.name.startswith("engine")]
    assert [r.getMessage() for r in engine_records if r.levelno >= logging.WARNING] == []
    chosen = [r.getMessage() for r in engine_records if r.name == "engine.providers"]
    assert len(chosen) == 1
    assert "using CPUExecutionProvider; preference was cuda, cpu (skipped cuda: " in chosen[0]


def test_provider_order_from_what_the_build_and_host_offer(mlp_path: Path) -> None:
    from engine.providers import _usable_providers

    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cpu_build = ["CPUExecutionProvider"]

    def order(
        providers: tuple[str, ...], available: list[str], driver: bool = True
    ) -> tuple[list[str], dict[str, list[str]]]:
        spec = ModelSpec("m", mlp_path, providers=providers)
        return _usable_providers(spec, available, cuda_driver=driver)

    assert order(("tensorrt", "cuda", "cpu"), gpu_build) == (["tensorrt", "cuda", "cpu"], {})
    # TensorRT runs on CUDA anyway: if it cannot start, CUDA is tried before CPU.
    assert order(("tensorrt",), gpu_build)[0] == ["tensorrt", "cuda", "cpu"]
    assert order(("cpu", "cuda"), gpu_build)[0] == ["cpu", "cuda"]
    usable, skipped = order(("tensorrt", "cuda"), cpu_build)
    assert usable == ["cpu"]
    ((reason, names),) = skipped.items()
    assert names == ["tensorrt", "cuda"]
    assert reason.startswith("not in this onnxruntime build (available: CPUExecutionProvider;")
    # onnxruntime-gpu on a host without the NVIDIA driver: skipped before ORT tries (and logs).
    usable, skipped = order(("cuda", "cpu"), gpu_build, driver=False)
    assert usable == ["cpu"]
    assert skipped == {"no CUDA driver on this host (libcuda not found)": ["cuda"]}
