"""One-shot GPU check of the engine: CUDA graphs vs none, TensorRT, cold start. ~4 min max.

    OUT=./out python bench/gpu_check.py [--budget-s 220]

Prints the onnxruntime version and providers, builds a ResNet-50 (torchvision, exported with
torch.onnx; without torch, a ResNet-like conv stack built with onnx.helper) and the example
anomaly model, and measures through the engine:
  - cold start: Engine.start() until every bucket is warm (one CUDA graph captured per bucket);
  - CUDA EP with graphs vs without: samples/s, p50/p99 latency, host CPU per batch (worker
    thread CPU from the engine's metrics, and whole-process CPU per batch);
  - TensorRT EP if present, in a subprocess with a time limit (skipped with a reason if absent
    or if the engine build does not finish in time);
  - a raw session.run reference at the largest bucket;
  - generation (bench/_gpu_generate.py): the paged-KV LLM decoder with IOBinding, CUDA graphs
    per decode batch size vs none, host CPU per step (skipped without CUDA).
Without CUDAExecutionProvider it says so and measures the CPU path (small shapes, quick).
Writes $OUT/gpu_check.json and $OUT/gpu_check.md and prints the table. Never downloads.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
T0 = time.monotonic()


def _install_metrics_shim_if_needed() -> str | None:
    """A bare GPU box may lack prometheus_client; the engine only needs the metric calls."""
    if importlib.util.find_spec("prometheus_client") is not None:
        return None

    class _Metric:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._sum = 0.0
            self._count = 0.0

        def labels(self, *args: object) -> _Metric:
            return self

        def inc(self, amount: float = 1.0) -> None:
            self._sum += amount
            self._count += 1

        def observe(self, value: float) -> None:
            self.inc(value)

        def set(self, value: float) -> None:
            self._sum = value

    shim = types.ModuleType("prometheus_client")
    shim.Counter = shim.Gauge = shim.Histogram = _Metric  # type: ignore[attr-defined]
    sys.modules["prometheus_client"] = shim
    return "prometheus_client missing: engine metrics counted by a local shim"


SHIM_NOTE = _install_metrics_shim_if_needed()

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from engine import Engine, ModelSpec  # noqa: E402
from engine import metrics as engine_metrics  # noqa: E402

if hasattr(ort, "preload_dlls"):  # ORT >= 1.21: CUDA/cuDNN from pip's nvidia-* packages
    try:
        ort.preload_dlls()
    except Exception as exc:  # informative only; CUDA EP init reports its own failure
        print(f"note: onnxruntime.preload_dlls() failed: {exc}")


def remaining_s(budget_s: float) -> float:
    return budget_s - (time.monotonic() - T0)


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


# -- models ----------------------------------------------------------------------------------


def export_resnet50(path: Path) -> str | None:
    """torchvision ResNet-50 (random weights) to ONNX with a dynamic batch axis."""
    try:
        import torch
        import torchvision
    except Exception as exc:
        return f"torch/torchvision unavailable ({type(exc).__name__}: {exc})"
    model = torchvision.models.resnet50(weights=None).eval()
    dummy = torch.randn(1, 3, 224, 224)
    kwargs: dict = {
        "input_names": ["image"],
        "output_names": ["logits"],
        "dynamic_axes": {"image": {0: "N"}, "logits": {0: "N"}},
        "opset_version": 17,
    }
    has_dynamo_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters
    attempts = [{"dynamo": False}, {"dynamo": True}] if has_dynamo_flag else [{}]
    errors = []
    for extra in attempts:  # the TorchScript exporter first: no onnxscript needed
        try:
            with torch.no_grad():
                torch.onnx.export(model, (dummy,), str(path), **kwargs, **extra)
            return None
        except Exception as exc:
            errors.append(f"export {extra or 'default'} failed: {type(exc).__name__}: {exc}"[:300])
    return "; ".join(errors)


def build_conv_stack(path: Path, image: int) -> None:
    """A ResNet-like conv stack (stem, 4 stages of 3x3 convs, pool, FC 1000)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current, channels = "image", 3

    def conv(name: str, source: str, c_in: int, c_out: int, stride: int) -> str:
        weight = (rng.normal(size=(c_out, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in))).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"{name}_w"))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}_b"))
        nodes.append(
            helper.make_node(
                "Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_c"],
                pads=[1, 1, 1, 1], strides=[stride, stride],
            )
        )  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        return f"{name}_r"

    current = conv("stem", current, channels, 64, 2)
    channels = 64
    for stage, (width, blocks) in enumerate([(64, 2), (128, 2), (256, 2), (512, 2)]):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            current = conv(f"s{stage}b{block}", current, channels, width, stride)
            channels = width
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
    fc = (rng.normal(size=(channels, 1000)) / np.sqrt(channels)).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "conv_stack",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


# -- measurement -----------------------------------------------------------------------------


def _metric_totals(model: str) -> dict[str, float]:
    """(count, sum) of the engine's batch histograms for `model`."""
    out = {}
    for key, histogram in (
        ("rows", engine_metrics.BATCH_ROWS),
        ("cpu", engine_metrics.BATCH_CPU_SECONDS),
        ("run", engine_metrics.RUN_SECONDS),
    ):
        child = histogram.labels(model)
        if hasattr(child, "_sum") and hasattr(child._sum, "get"):  # prometheus_client
            out[f"{key}_sum"] = child._sum.get()
            out[f"{key}_count"] = sum(b.get() for b in child._buckets)
        else:  # shim
            out[f"{key}_sum"] = child._sum
            out[f"{key}_count"] = child._count
    return out


async def closed_loop(engine: Engine, model: str, feed: dict, concurrency: int, seconds: float):
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await engine.infer(model, feed)
            latencies.append(time.perf_counter() - start)

    before = _metric_totals(model)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = _metric_totals(model)
    batches = after["rows_count"] - before["rows_count"]
    rows = after["rows_sum"] - before["rows_sum"]
    lat = np.array(latencies) * 1e3
    return {
        "concurrency": concurrency,
        "samples_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "mean_batch_rows": round(rows / batches, 1) if batches else 0.0,
        "worker_cpu_ms_per_batch": round(
            (after["cpu_sum"] - before["cpu_sum"]) / batches * 1e3, 3
        ) if batches else None,
        "worker_wall_ms_per_batch": round(
            (after["run_sum"] - before["run_sum"]) / batches * 1e3, 3
        ) if batches else None,
        "process_cpu_ms_per_batch": round(cpu / batches * 1e3, 3) if batches else None,
    }  # fmt: skip


def reference_session(path: Path) -> ort.InferenceSession | None:
    """A plain session (no graphs, no IOBinding) to check the engine's outputs against."""
    providers = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in providers]
    try:
        return ort.InferenceSession(str(path), providers=chosen)
    except Exception as exc:
        log(f"reference session failed: {exc}")
        return None


async def check_outputs(engine: Engine, model: str, feed_row: dict, path: Path) -> float | None:
    """Max relative error of engine results vs. plain session.run, for requests of 1, 3 and
    5 rows sent together (one padded batch), then 1 row alone (the smallest bucket)."""
    reference = reference_session(path)
    if reference is None:
        return None
    name, row = next(iter(feed_row.items()))
    rng = np.random.default_rng(7)
    requests = [
        {name: (row + rng.normal(size=(n, *row.shape[1:]))).astype(row.dtype)} for n in (1, 3, 5, 1)
    ]
    results = await asyncio.gather(*(engine.infer(model, r) for r in requests[:3]))
    results.append(await engine.infer(model, requests[3]))
    worst = 0.0
    for request, result in zip(requests, results, strict=True):
        expected = reference.run(None, request)
        for output, want in zip(reference.get_outputs(), expected, strict=True):
            got = result[output.name]
            assert got.shape == want.shape, (output.name, got.shape, want.shape)
            scale = float(np.abs(want).max()) or 1.0
            worst = max(worst, float(np.abs(got - want).max()) / scale)
    return worst


async def measure_engine(
    label: str,
    spec: ModelSpec,
    feed_row: dict,
    loads: list[tuple[int, float]],
    require_provider: str | None = None,
) -> dict:
    """Cold start + correctness + closed-loop loads for one configuration; never raises."""
    result: dict = {"config": label, "requested_providers": list(spec.providers)}
    engine = Engine([spec])
    try:
        started = time.perf_counter()
        await engine.start()
        result["cold_start_s"] = round(time.perf_counter() - started, 2)
        info = engine.model_info(spec.name)
        result["provider"] = info.provider
        result["cuda_graphs"] = info.cuda_graphs
        result["buckets"] = list(info.buckets)
        if require_provider is not None and info.provider != require_provider:
            result["skipped"] = (
                f"{require_provider} did not initialise (the engine fell back to "
                f"{info.provider}; see the log above, e.g. TensorRT libraries missing)"
            )
            log(f"{label}: {result['skipped']}")
            return result
        error = await check_outputs(engine, spec.name, feed_row, spec.path)
        result["max_rel_err_vs_plain_run"] = None if error is None else float(f"{error:.3g}")
        log(f"{label}: outputs vs plain session.run: max relative error {error}")
        log(f"{label}: ready on {info.provider} (graphs {info.cuda_graphs}) "
            f"in {result['cold_start_s']} s")  # fmt: skip
        result["loads"] = []
        for concurrency, seconds in loads:
            await closed_loop(engine, spec.name, feed_row, concurrency, min(0.3, seconds))
            load = await closed_loop(engine, spec.name, feed_row, concurrency, seconds)
            result["loads"].append(load)
            log(f"{label}: {load}")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{label}: FAILED {result['error']}")
        traceback.print_exc()
    finally:
        await engine.close()
    return result


def raw_reference(path: Path, providers: list, feed: dict, seconds: float) -> dict:
    """Plain session.run with numpy in/out at one batch size (includes host<->device copies)."""
    try:
        session = ort.InferenceSession(str(path), providers=providers)
        for _ in range(3):
            session.run(None, feed)
        latencies = []
        cpu0, t0 = time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(latencies) < 5:
            start = time.perf_counter()
            session.run(None, feed)
            latencies.append(time.perf_counter() - start)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows = next(iter(feed.values())).shape[0]
        lat = np.array(latencies) * 1e3
        return {
            "config": f"raw session.run batch {rows} on {session.get_providers()[0]}",
            "samples_per_s": round(rows * len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "process_cpu_ms_per_batch": round(cpu / len(latencies) * 1e3, 3),
        }
    except Exception as exc:
        return {"config": "raw reference", "error": f"{type(exc).__name__}: {exc}"}


# -- TensorRT in a subprocess (its engine build cannot be interrupted in-process) -------------


def run_tensorrt_child(model_path: Path, image: int, buckets: tuple[int, ...], limit_s: float):
    if limit_s < 30:
        return {"config": "tensorrt", "skipped": f"only {limit_s:.0f} s of budget left"}
    out = Path(tempfile.mkdtemp()) / "trt.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--trt-child", str(model_path),
               "--trt-out", str(out), "--image", str(image),
               "--buckets", ",".join(map(str, buckets))]  # fmt: skip
    log(f"tensorrt: building in a subprocess, limit {limit_s:.0f} s")
    try:
        subprocess.run(command, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return {
            "config": "tensorrt",
            "skipped": f"TensorRT engine build + measurement did not finish within {limit_s:.0f} s",
        }
    if not out.exists():
        return {"config": "tensorrt", "error": "child exited without a result (see its output)"}
    return json.loads(out.read_text())


async def trt_child(model_path: Path, out: Path, image: int, buckets: tuple[int, ...]) -> None:
    cache_dir = Path(tempfile.mkdtemp(prefix="trt_cache_"))
    spec = ModelSpec(
        "resnet_trt", model_path, providers=("tensorrt",), buckets=buckets,
        max_queue_delay_s=0.0, queue_limit=4096, trt_fp16=True, cache_dir=cache_dir,
    )  # fmt: skip
    row = {"image": np.random.default_rng(0).normal(size=(1, 3, image, image)).astype(np.float32)}
    result = await measure_engine(
        "tensorrt fp16 + graphs", spec, row, [(1, 2.0), (128, 3.0)], require_provider="tensorrt"
    )
    out.write_text(json.dumps(result))


# -- report ----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        "# gatewayd engine GPU check",
        "",
        f"- onnxruntime {report['onnxruntime']}, providers: {', '.join(report['providers'])}",
        f"- device: {report['device']}",
        f"- resnet model: {report['resnet_model']}",
        f"- CUDA context + first session (before any cold start below): "
        f"{report.get('cuda_context_init_s', 'n/a')} s",
    ]
    lines += [f"- note: {note}" for note in report["notes"]]
    lines += [
        "",
        "| model | config | provider | graphs | cold start s | max rel err | callers | samples/s "
        "| p50 ms | p99 ms | batch rows | worker CPU ms/batch | process CPU ms/batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, results in report["results"].items():
        for r in results:
            if "loads" not in r:
                reason = r.get("error") or r.get("skipped") or ""
                if "samples_per_s" in r:  # raw reference
                    lines.append(
                        f"| {model} | {r['config']} | | | | | 1 | {r['samples_per_s']} "
                        f"| {r['p50_ms']} | {r['p99_ms']} | | | {r['process_cpu_ms_per_batch']} |"
                    )
                else:
                    lines.append(f"| {model} | {r['config']} | {reason} ||||||||||")
                continue
            for load in r["loads"]:
                lines.append(
                    f"| {model} | {r['config']} | {r.get('provider')} | {r.get('cuda_graphs')} "
                    f"| {r.get('cold_start_s')} | {r.get('max_rel_err_vs_plain_run')} "
                    f"| {load['concurrency']} | {load['samples_per_s']}"
                    f" | {load['p50_ms']} | {load['p99_ms']} | {load['mean_batch_rows']} "
                    f"| {load['worker_cpu_ms_per_batch']} | {load['process_cpu_ms_per_batch']} |"
                )
            if r.get("error"):
                lines.append(f"| {model} | {r['config']} | ERROR: {r['error']} ||||||||||")
    return "\n".join(lines) + "\n"


def device_name() -> str:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    except Exception:
        pass
    return f"no nvidia-smi; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


async def main(budget_s: float) -> int:
    out_dir = Path(os.environ.get("OUT", "./out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    providers = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in providers
    has_trt = "TensorrtExecutionProvider" in providers
    notes: list[str] = [SHIM_NOTE] if SHIM_NOTE else []
    print(f"onnxruntime {ort.__version__}; available providers: {', '.join(providers)}")
    if not has_cuda:
        message = (
            "CUDAExecutionProvider is NOT available in this onnxruntime build "
            "(install onnxruntime-gpu); measuring the CPU path only, with small shapes"
        )
        print("WARNING: " + message)
        notes.append(message)
    report: dict = {
        "onnxruntime": ort.__version__,
        "providers": providers,
        "device": device_name(),
        "python": sys.version.split()[0],
        "notes": notes,
        "results": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    image = 224 if has_cuda else 64
    buckets = (1, 2, 4, 8, 16, 32, 64) if has_cuda else (1, 2, 4, 8)
    resnet_path = tmp / "resnet.onnx"
    why_not_torch = export_resnet50(resnet_path) if has_cuda else "CPU mode: small conv stack"
    if why_not_torch is None:
        report["resnet_model"] = "torchvision resnet50 (random weights), exported by torch.onnx"
    else:
        build_conv_stack(resnet_path, image)
        report["resnet_model"] = f"ResNet-like conv stack via onnx.helper ({why_not_torch})"
    log(f"model ready: {report['resnet_model']}")
    row = {"image": np.random.default_rng(0).normal(size=(1, 3, image, image)).astype(np.float32)}
    anomaly = ROOT / "engine" / "models" / "anomaly.onnx"
    window = {"window": np.random.default_rng(1).normal(20, 1, size=(1, 32)).astype(np.float32)}

    def spec(name: str, path: Path, providers: tuple[str, ...], graphs: bool, bks) -> ModelSpec:
        return ModelSpec(
            name, path, providers=providers, buckets=bks, max_queue_delay_s=0.0,
            queue_limit=4096, cuda_graphs=graphs, intra_op_threads=0 if not has_cuda else 1,
        )  # fmt: skip

    resnet_results: list[dict] = []
    anomaly_results: list[dict] = []
    report["results"] = {"resnet": resnet_results, "anomaly": anomaly_results}
    if has_cuda:
        # Create the CUDA context (and cuBLAS/cuDNN handles) once up front, so the first
        # configuration's cold start is not charged for it.
        started = time.perf_counter()
        warm = reference_session(anomaly)
        if warm is not None:
            warm.run(None, window)
        report["cuda_context_init_s"] = round(time.perf_counter() - started, 2)
        log(f"CUDA context + first session: {report['cuda_context_init_s']} s")
        resnet_loads = [(1, 2.0), (128, 4.0)]
        anomaly_loads = [(1, 1.5), (256, 2.5)]
        for graphs in (True, False):
            if remaining_s(budget_s) < 40:
                resnet_results.append({"config": f"cuda graphs={graphs}", "skipped": "budget"})
                continue
            label = f"cuda {'with' if graphs else 'without'} graphs"
            resnet_results.append(
                await measure_engine(
                    label,
                    spec(f"resnet_g{int(graphs)}", resnet_path, ("cuda",), graphs, buckets),
                    row,
                    resnet_loads,
                )
            )
            anomaly_results.append(
                await measure_engine(
                    label,
                    spec(f"anomaly_g{int(graphs)}", anomaly, ("cuda",), graphs, buckets),
                    window,
                    anomaly_loads,
                )
            )
        big = {"image": np.repeat(row["image"], buckets[-1], axis=0)}
        resnet_results.append(raw_reference(resnet_path, ["CUDAExecutionProvider"], big, 2.0))
        if has_trt:
            resnet_results.append(
                run_tensorrt_child(
                    resnet_path, image, buckets, min(150.0, remaining_s(budget_s) - 15)
                )
            )
        else:
            resnet_results.append(
                {"config": "tensorrt", "skipped": "TensorrtExecutionProvider not in this build"}
            )
    else:
        loads = [(1, 1.0), (16, 1.5)]
        resnet_results.append(
            await measure_engine(
                "cpu", spec("resnet_cpu", resnet_path, ("cuda", "cpu"), True, buckets), row, loads
            )
        )
        anomaly_results.append(
            await measure_engine(
                "cpu",
                spec("anomaly_cpu", anomaly, ("cuda", "cpu"), True, buckets),
                window,
                [(1, 1.0), (256, 1.5)],
            )
        )
        big = {"image": np.repeat(row["image"], buckets[-1], axis=0)}
        resnet_results.append(raw_reference(resnet_path, ["CPUExecutionProvider"], big, 1.0))
        resnet_results.append({"config": "tensorrt", "skipped": "no CUDA in this build"})
    from bench._gpu_generate import generation_section
    from bench._gpu_generate import markdown as generation_markdown

    if not has_cuda:
        generation = {"skipped": "no CUDAExecutionProvider in this onnxruntime build"}
    elif remaining_s(budget_s) < 60:
        generation = {"skipped": f"budget: {remaining_s(budget_s):.0f} s left"}
    else:
        try:
            generation = generation_section("cuda", seconds=2.0)
        except Exception as exc:  # report it, keep the rest of the check
            generation = {"skipped": f"failed: {exc!r}"}
            traceback.print_exc()
    report["generation"] = generation  # its own table (see bench/_gpu_generate.py)
    report["total_s"] = round(time.monotonic() - T0, 1)
    table = markdown(report) + generation_markdown(generation)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out_dir / "gpu_check.md").write_text(table)
    print()
    print(table)
    print(json.dumps({"bench": "gpu_check", **{k: v for k, v in report.items() if k != "notes"}}))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=220.0)
    parser.add_argument("--trt-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trt-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--buckets", default="1,2,4,8,16,32,64", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trt_child:
        buckets = tuple(int(b) for b in args.buckets.split(","))
        asyncio.run(trt_child(args.trt_child, args.trt_out, args.image, buckets))
        sys.exit(0)
    sys.exit(asyncio.run(main(args.budget_s)))
