"""Choosing execution providers and creating the ONNX Runtime session for a model.

Preference order comes from `ModelSpec.providers`; a provider this onnxruntime build lacks,
or one that fails to initialise, is skipped with a log line saying why, and CPU is always the
last resort. Loading also validates that the file exists and parses (`ModelLoadError`).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from engine.errors import ModelLoadError
from engine.io import TensorSpec, describe_io
from engine.spec import ModelSpec

log = logging.getLogger(__name__)

ORT_PROVIDER = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_SHORT_NAME = {ort_name: short for short, ort_name in ORT_PROVIDER.items()}
_PROVIDER_MISSING = object()  # marker: the provider's shared libraries could not be loaded


@dataclass(frozen=True, slots=True)
class LoadedSession:
    """A created session and what was actually chosen for it."""

    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str  # "tensorrt", "cuda" or "cpu": the provider running the graph
    device: str  # where bucket buffers live: "cuda" or "cpu"
    cuda_graphs: bool  # whether one CUDA graph per bucket will be captured


def load_session(spec: ModelSpec) -> LoadedSession:
    """Create the session for `spec`, falling back through its providers to CPU.

    Logs one info line naming the provider chosen (and why preferred ones were skipped).
    A GPU provider absent from this onnxruntime build, or on a host without a CUDA driver,
    is expected on a CPU-only host and is not a warning; a warning is kept for a GPU
    provider that should work but failed, and for a fallback to CPU the preference did not
    list."""
    where = f"engine: model {spec.name!r}"
    path = spec.path
    if not path.is_file():
        raise ModelLoadError(f"model {spec.name!r}: file {str(path)!r} not found")
    # A CPU session first: it proves the file is a loadable model (clean error if not), gives
    # the input/output metadata the TensorRT profiles need, and is the session we keep when
    # no GPU provider is usable.
    try:
        cpu_session = _create(spec, ["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: cannot load {str(path)!r} "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    inputs, outputs = describe_io(spec.name, cpu_session)
    available = ort.get_available_providers()
    needs_cuda = any(ORT_PROVIDER[p] in available for p in spec.providers if p != "cpu")
    candidates, skipped = _usable_providers(
        spec, available, cuda_driver=needs_cuda and cuda_driver_present()
    )
    note = "".join(f" (skipped {', '.join(names)}: {why})" for why, names in skipped.items())
    preference = ", ".join(spec.providers)
    for provider in candidates:
        if provider == "cpu":
            break
        graph_options = (True, False) if spec.cuda_graphs else (False,)
        for cuda_graphs in graph_options:
            session = _try_gpu_session(spec, provider, cuda_graphs, inputs, where)
            if session is _PROVIDER_MISSING:
                break  # its libraries are missing: retrying without graphs cannot help
            if isinstance(session, ort.InferenceSession):
                log.info(
                    "%s: using %s (cuda graphs %s); preference was %s%s",
                    where,
                    ORT_PROVIDER[provider],
                    "on" if cuda_graphs else "off",
                    preference,
                    note,
                )
                return LoadedSession(session, inputs, outputs, provider, "cuda", cuda_graphs)
    if candidates[0] != "cpu":
        log.warning("%s: no GPU provider could be initialised; falling back to CPU", where)
    # Quiet (info) when CPU is among the preferences; a warning when it was not asked for.
    level = logging.INFO if "cpu" in spec.providers else logging.WARNING
    log.log(level, "%s: using CPUExecutionProvider; preference was %s%s", where, preference, note)
    return LoadedSession(cpu_session, inputs, outputs, "cpu", "cpu", cuda_graphs=False)


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads on this host (GPU providers need it)."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _usable_providers(
    spec: ModelSpec, available: list[str], *, cuda_driver: bool
) -> tuple[list[str], dict[str, list[str]]]:
    """The preferred providers this build and host can run, in order, always ending with
    cpu; and the other preferred ones by the reason they were skipped."""
    usable: list[str] = []
    skipped: dict[str, list[str]] = {}
    not_built = (
        f"not in this onnxruntime build (available: {', '.join(available)}; install "
        "onnxruntime-gpu for CUDA/TensorRT)"
    )
    for provider in spec.providers:
        if ORT_PROVIDER[provider] not in available:
            skipped.setdefault(not_built, []).append(provider)
        elif provider != "cpu" and not cuda_driver:
            skipped.setdefault("no CUDA driver on this host (libcuda not found)", []).append(
                provider
            )
        else:
            usable.append(provider)
    if (
        cuda_driver
        and "tensorrt" in usable
        and "cuda" not in usable
        and ORT_PROVIDER["cuda"] in available
    ):
        # TensorRT runs on top of CUDA anyway; if it cannot start, plain CUDA beats CPU.
        usable.insert(usable.index("tensorrt") + 1, "cuda")
    if "cpu" not in usable:
        usable.append("cpu")
    return usable, skipped


def _try_gpu_session(
    spec: ModelSpec,
    provider: str,
    cuda_graphs: bool,
    inputs: tuple[TensorSpec, ...],
    where: str,
) -> ort.InferenceSession | object | None:
    """The session, None if this option failed, or _PROVIDER_MISSING if the provider itself
    could not be loaded (onnxruntime then silently builds a session without it)."""
    providers: list[Any] = []
    if provider == "tensorrt":
        providers.append((ORT_PROVIDER["tensorrt"], _tensorrt_options(spec, inputs, cuda_graphs)))
        # CUDA takes the nodes TensorRT cannot; only one provider may own the graph capture.
        providers.append((ORT_PROVIDER["cuda"], {"device_id": "0"}))
    else:
        providers.append(
            (ORT_PROVIDER["cuda"], {"device_id": "0", "enable_cuda_graph": str(int(cuda_graphs))})
        )
    providers.append(ORT_PROVIDER["cpu"])
    try:
        session = _create(spec, providers)
    except Exception as exc:
        log.warning(
            "%s: provider %s%s failed to initialise (%s: %s); trying the next option",
            where,
            provider,
            " with cuda graphs" if cuda_graphs else "",
            type(exc).__name__,
            _first_line(exc),
        )
        return None
    taken = _SHORT_NAME.get(session.get_providers()[0], "cpu")
    if taken != provider:
        # onnxruntime-gpu without a working CUDA install silently creates a CPU session.
        log.warning(
            "%s: provider %s is in this build but did not initialise (session providers: %s; "
            "see onnxruntime's message above: usually CUDA, cuDNN or TensorRT libraries missing)",
            where,
            provider,
            ", ".join(session.get_providers()),
        )
        return _PROVIDER_MISSING
    return session


def _tensorrt_options(
    spec: ModelSpec, inputs: tuple[TensorSpec, ...], cuda_graphs: bool
) -> dict[str, str]:
    def profile(rows: int) -> str:
        return ",".join(
            f"{i.name}:" + "x".join(str(d) for d in (rows, *(i.row_shape or ()))) for i in inputs
        )

    options = {
        "device_id": "0",
        "trt_fp16_enable": str(int(spec.trt_fp16)),
        "trt_cuda_graph_enable": str(int(cuda_graphs)),
        "trt_profile_min_shapes": profile(spec.buckets[0]),
        "trt_profile_opt_shapes": profile(spec.buckets[-1]),
        "trt_profile_max_shapes": profile(spec.buckets[-1]),
    }
    if spec.cache_dir is not None:
        cache_dir = Path(spec.cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        options |= {
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(cache_dir),
        }
    else:
        log.warning(
            "engine: model %r: TensorRT without cache_dir rebuilds its engine at every start "
            "(can take minutes); set cache_dir",
            spec.name,
        )
    return options


def _create(spec: ModelSpec, providers: list[Any]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(spec.path), sess_options=options, providers=providers)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
