"""Benchmark: the engine's dynamic batcher vs raw ONNX Runtime vs a naive thread pool.

    python bench/engine.py [--seconds 1.5] [--repeats 3] [--models mlp,anomaly] [--uvloop]
                           [--pairs 7]

Same process, same models, side by side:
  raw      session.run on one thread at batch 1..256 (the ceiling for each batch size)
  engine   Engine.infer with 1, 16, 64, 256 concurrent callers, one row per request
  naive    the same callers, each doing session.run for its one row via a thread pool
Models: an MLP (256 -> 512 -> 512 -> 512 -> 16, where batching pays), a wider one (1024),
and the example anomaly autoencoder (so small that per-request cost dominates: it shows the
engine's own overhead). Prints a table, then one JSON line with the target ratios:
  engine@256 / raw@(batch the engine used)  (target >= 0.6)
  infer_many 16x16 / raw@(same batch)       (256 rows in flight from 16 callers that each
                                             send 16 one-row requests per call)
  engine@256 / naive@256                    (target >= 3)
  engine@1 p50 - raw@1 p50                  (target <= 100 us), with max_queue_delay_s=0,
                                            with the default 2 ms (adaptive batching), and
                                            with inline runs (inline_max_run_s=0.5 ms)
The target figures come from back-to-back slices (raw, then the engine, `--pairs` pairs per
repeat: both sides of a ratio see the same load on a shared machine), median of the pairs;
every figure is then the median over `--repeats` interleaved repeats. The JSON line also
carries the load average before and after the run (the machine is shared) and whether each
target was met.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

# sys.path[0] is bench/, where this file would shadow the `engine` package: put the engine
# under test first, PYTHONPATH's first entry when set (A/B runs against another checkout).
sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(":")[0] or str(Path(__file__).parents[1]))
import engine as engine_package
from engine import Engine, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
RAW_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONCURRENCY = (1, 16, 64, 256)
BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PAIRS = 7  # back-to-back raw/engine slices behind each target ratio (--pairs)
INLINE_MAX_RUN_S = 0.0005  # the inline variant at concurrency 1
MANY_CALLERS, MANY_REQUESTS = 16, 16  # infer_many: 16 callers x 16 one-row requests = 256


def build_mlp(path: Path, widths: tuple[int, ...] = (256, 512, 512, 512, 16)) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        w = (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(
            np.zeros(fan_out, np.float32), f"b{i}")]  # fmt: skip
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        last = i == len(widths) - 2
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
        current = f"a{i}" if last else f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "bench_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stats(latencies_s: list[float], samples: int, wall_s: float, cpu_s: float) -> dict:
    lat = np.array(latencies_s) * 1e6
    return {
        "samples_per_s": samples / wall_s,
        "p50_us": float(np.percentile(lat, 50)),
        "p99_us": float(np.percentile(lat, 99)),
        "cpu_us_per_sample": cpu_s / samples * 1e6,
    }


def bench_raw(sess: ort.InferenceSession, name: str, row: np.ndarray, seconds: float) -> dict:
    results = {}
    for batch in RAW_BATCHES:
        x = np.repeat(row, batch, axis=0)
        feed = {name: x}
        sess.run(None, feed)
        latencies = []
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds / len(RAW_BATCHES) * 2
        while True:
            start = time.perf_counter()
            sess.run(None, feed)
            end = time.perf_counter()
            latencies.append(end - start)
            if end > deadline and len(latencies) >= 20:
                break
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        results[batch] = stats(latencies, batch * len(latencies), wall, cpu)
    return results


async def closed_loop(call, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    stop_at = 0.0

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    for _ in range(max(1, 32 // concurrency)):  # warm the path
        await call()
    stop_at = time.perf_counter() + seconds  # after the warm-up, which may take a while
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return stats(latencies, len(latencies), wall, cpu)


def batch_metrics(model: str) -> tuple[float, float]:
    count = REGISTRY.get_sample_value("gatewayd_engine_batch_rows_count", {"model": model}) or 0
    total = REGISTRY.get_sample_value("gatewayd_engine_batch_rows_sum", {"model": model}) or 0
    return count, total


async def bench_default_delay(path: Path, model: str, name: str, row: np.ndarray, seconds: float):
    """One closed-loop caller on a model with the default settings (2 ms max_queue_delay,
    adaptive batching): the lone request must not wait for the delay."""
    engine = Engine([ModelSpec(model, path, buckets=BUCKETS, queue_limit=4096)])
    await engine.start()
    feed = {name: row}

    async def call() -> None:
        await engine.infer(model, feed)

    try:
        return await closed_loop(call, 1, seconds)
    finally:
        await engine.close()


async def bench_engine(path: Path, model: str, name: str, row: np.ndarray, seconds: float):
    spec = ModelSpec(model, path, buckets=BUCKETS, max_queue_delay_s=0.0, queue_limit=4096)
    engine = Engine([spec])
    await engine.start()
    results = {}
    feed = {name: row}

    async def call() -> None:
        await engine.infer(model, feed)

    try:
        for concurrency in CONCURRENCY:
            before = batch_metrics(model)
            results[concurrency] = await closed_loop(call, concurrency, seconds)
            await asyncio.sleep(0.05)  # the idle worker flushes its batch metrics (1 ms)
            count, total = (a - b for a, b in zip(batch_metrics(model), before, strict=True))
            results[concurrency]["mean_batch_rows"] = total / count if count else 0.0
    finally:
        await engine.close()
    return results


async def bench_naive(sess: ort.InferenceSession, name: str, row: np.ndarray, seconds: float):
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4))
    feed = {name: row}
    results = {}
    try:
        for concurrency in (1, 256):

            async def call() -> None:
                await loop.run_in_executor(pool, sess.run, None, feed)

            results[concurrency] = await closed_loop(call, concurrency, seconds)
    finally:
        pool.shutdown()
    return results


def raw_slice(sess: ort.InferenceSession, feed: dict, seconds: float) -> dict:
    latencies = []
    t0 = time.perf_counter()
    while True:
        start = time.perf_counter()
        sess.run(None, feed)
        end = time.perf_counter()
        latencies.append(end - start)
        if end - t0 > seconds and len(latencies) >= 10:
            break
    rows = feed[next(iter(feed))].shape[0]
    return {
        "samples_per_s": rows * len(latencies) / (time.perf_counter() - t0),
        "p50_us": float(np.median(latencies) * 1e6),
    }


async def paired(
    path: Path, model: str, sess: ort.InferenceSession, name: str, row: np.ndarray,
    used: int, seconds: float, pairs: int,
) -> dict:  # fmt: skip
    """The target ratios from back-to-back slices (raw, then the engine, `pairs` times), so
    both sides of each ratio see the same machine load; medians of the per-pair ratios."""
    fast = Engine([ModelSpec(model, path, buckets=BUCKETS, max_queue_delay_s=0, queue_limit=4096)])
    default = Engine([ModelSpec(f"{model}_d", path, buckets=BUCKETS, queue_limit=4096)])
    inline = Engine(
        [
            ModelSpec(
                f"{model}_i",
                path,
                buckets=BUCKETS,
                queue_limit=4096,
                inline_max_run_s=INLINE_MAX_RUN_S,
            )
        ]
    )
    await fast.start()
    await default.start()
    await inline.start()
    feed1 = {name: row}
    feed_used = {name: np.repeat(row, used, axis=0)}

    async def call_fast() -> None:
        await fast.infer(model, feed1)

    async def call_default() -> None:
        await default.infer(f"{model}_d", feed1)

    async def call_inline() -> None:
        await inline.infer(f"{model}_i", feed1)

    many = [feed1] * MANY_REQUESTS

    async def call_many() -> None:
        await fast.infer_many(model, many)

    ratios, overheads, default_overheads, inline_overheads = [], [], [], []
    many_ratios: list[float] = []
    try:
        for _ in range(pairs):
            raw_used = raw_slice(sess, feed_used, seconds)
            eng256 = await closed_loop(call_fast, 256, seconds)
            ratios.append(eng256["samples_per_s"] / raw_used["samples_per_s"])
            if hasattr(fast, "infer_many"):
                eng_many = await closed_loop(call_many, MANY_CALLERS, seconds)
                samples = eng_many["samples_per_s"] * MANY_REQUESTS
                many_ratios.append(samples / raw_used["samples_per_s"])
            raw1 = raw_slice(sess, feed1, seconds)
            eng1 = await closed_loop(call_fast, 1, seconds)
            eng1_default = await closed_loop(call_default, 1, seconds)
            eng1_inline = await closed_loop(call_inline, 1, seconds)
            overheads.append(eng1["p50_us"] - raw1["p50_us"])
            default_overheads.append(eng1_default["p50_us"] - raw1["p50_us"])
            inline_overheads.append(eng1_inline["p50_us"] - raw1["p50_us"])
    finally:
        await fast.close()
        await default.close()
        await inline.close()
    return {
        "engine256_vs_raw_at_used_batch": float(np.median(ratios)),
        "engine1_overhead_us": float(np.median(overheads)),
        "engine1_default_delay_overhead_us": float(np.median(default_overheads)),
        "engine1_inline_overhead_us": float(np.median(inline_overheads)),
        "many256_vs_raw_at_used_batch": float(np.median(many_ratios)) if many_ratios else None,
        "pairs": pairs,
    }


def nearest_bucket(rows: float) -> int:
    return min(RAW_BATCHES, key=lambda b: abs(b - rows))


async def bench_model(
    label: str, path: Path, name: str, row: np.ndarray, seconds: float, pairs: int
) -> dict:
    sess = session(path)
    raw = bench_raw(sess, name, row, seconds)
    engine = await bench_engine(path, f"bench_{label}", name, row, seconds)
    engine_default = await bench_default_delay(path, f"bench_{label}_d", name, row, seconds)
    naive = await bench_naive(sess, name, row, seconds)
    used = nearest_bucket(engine[256]["mean_batch_rows"])
    pair = await paired(path, f"bench_{label}_p", sess, name, row, used, seconds / 2, pairs)
    summary = {
        "engine256_vs_raw_at_used_batch": pair["engine256_vs_raw_at_used_batch"],
        "raw_batch_compared": used,
        "engine256_vs_naive256": engine[256]["samples_per_s"] / naive[256]["samples_per_s"],
        "engine1_overhead_us": pair["engine1_overhead_us"],
        "engine1_default_delay_overhead_us": pair["engine1_default_delay_overhead_us"],
        "engine1_inline_overhead_us": pair["engine1_inline_overhead_us"],
        "many256_vs_raw_at_used_batch": pair["many256_vs_raw_at_used_batch"],
        "paired_slices": pair["pairs"],
    }
    return {
        "raw": raw,
        "engine": engine,
        "engine_default_delay": {1: engine_default},
        "naive": naive,
        "summary": summary,
    }


def median_result(runs: list[dict]) -> dict:
    """Element-wise median of repeated bench_model results (same keys in every run)."""

    def merge(values: list) -> object:
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, float):
            return float(np.median(values))
        if first is None:
            return None
        return first if all(v == first for v in values) else max(set(values), key=values.count)

    return merge(runs)  # type: ignore[return-value]


def print_table(label: str, result: dict) -> None:
    print(f"\n== {label} ==")
    header = f"{'mode':<8}{'batch/conc':>11}{'samples/s':>13}{'p50 us':>10}{'p99 us':>10}"
    print(header + f"{'cpu us/sample':>15}{'batch rows':>12}")
    rows = [("raw", k, v) for k, v in result["raw"].items()]
    rows += [("engine", k, v) for k, v in result["engine"].items()]
    rows += [("eng-2ms", k, v) for k, v in result["engine_default_delay"].items()]
    rows += [("naive", k, v) for k, v in result["naive"].items()]
    for mode, key, v in rows:
        batch = f"{v['mean_batch_rows']:.1f}" if "mean_batch_rows" in v else ""
        print(
            f"{mode:<8}{key:>11}{v['samples_per_s']:>13.0f}{v['p50_us']:>10.0f}{v['p99_us']:>10.0f}"
            f"{v['cpu_us_per_sample']:>15.1f}{batch:>12}"
        )
    s = result["summary"]
    print(
        f"engine@256 / raw@{s['raw_batch_compared']}: {s['engine256_vs_raw_at_used_batch']:.2f}x"
        f" (target >= 0.6); engine@256 / naive@256: {s['engine256_vs_naive256']:.2f}x"
        f" (target >= 3); engine@1 overhead: {s['engine1_overhead_us']:.0f} us, with the"
        f" default 2 ms delay {s['engine1_default_delay_overhead_us']:.0f} us, inline"
        f" {s['engine1_inline_overhead_us']:.0f} us (target <= 100)"
    )
    if s["many256_vs_raw_at_used_batch"] is not None:
        print(
            f"infer_many {MANY_CALLERS}x{MANY_REQUESTS} / raw@{s['raw_batch_compared']}:"
            f" {s['many256_vs_raw_at_used_batch']:.2f}x"
        )


async def main(seconds: float, repeats: int, only: set[str] | None, pairs: int) -> None:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        mlp = build_mlp(Path(tmp) / "mlp.onnx")
        wide = build_mlp(Path(tmp) / "mlp1024.onnx", (256, 1024, 1024, 1024, 16))
        row = np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)
        models = {
            "mlp": (mlp, "x", row),
            "mlp1024": (wide, "x", row),
            "anomaly": (
                ROOT / "engine" / "models" / "anomaly.onnx",
                "window",
                np.random.default_rng(2).normal(20, 1, size=(1, 32)).astype(np.float32),
            ),
        }
        if only:
            models = {k: v for k, v in models.items() if k in only}
        runs: dict[str, list[dict]] = {label: [] for label in models}
        for _ in range(repeats):  # interleaved: every model once per repeat
            for label, (path, name, row) in models.items():
                runs[label].append(await bench_model(label, path, name, row, seconds, pairs))
        results = {}
        for label, model_runs in runs.items():
            results[label] = median_result(model_runs)
            print_table(f"{label} (medians of {repeats})", results[label])
    line = {
        "bench": "engine",
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "loop": type(asyncio.get_running_loop()).__module__,
        "engine": str(Path(engine_package.__file__).resolve().parents[1]),
        "load_average_before": round(load_before, 1),
        "load_average_after": round(os.getloadavg()[0], 1),
    }
    for label, result in results.items():
        s = result["summary"]
        line[label] = {
            "raw_samples_per_s": {b: round(v["samples_per_s"]) for b, v in result["raw"].items()},
            "engine_samples_per_s": {
                c: round(v["samples_per_s"]) for c, v in result["engine"].items()
            },
            "engine_p50_us": {c: round(v["p50_us"]) for c, v in result["engine"].items()},
            "engine_p99_us": {c: round(v["p99_us"]) for c, v in result["engine"].items()},
            "engine_cpu_us_per_req": {
                c: round(v["cpu_us_per_sample"], 1) for c, v in result["engine"].items()
            },
            "engine_mean_batch": {
                c: round(v["mean_batch_rows"], 1) for c, v in result["engine"].items()
            },
            "naive_samples_per_s": {
                c: round(v["samples_per_s"]) for c, v in result["naive"].items()
            },
            "engine_default_delay_p50_us_c1": round(result["engine_default_delay"][1]["p50_us"]),
            "raw_p50_us_batch1": round(result["raw"][1]["p50_us"]),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()},
            "met_ratio_0_6": s["engine256_vs_raw_at_used_batch"] >= 0.6,
            "met_c1_100us": s["engine1_default_delay_overhead_us"] <= 100,
            "met_c1_100us_inline": s["engine1_inline_overhead_us"] <= 100,
        }
    print(json.dumps(line))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians)")
    parser.add_argument("--models", default="", help="comma list of mlp,mlp1024,anomaly")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as the daemon)")
    parser.add_argument("--pairs", type=int, default=PAIRS, help="raw/engine slice pairs")
    args = parser.parse_args()
    only = {m for m in args.models.split(",") if m} or None
    if args.uvloop:
        import uvloop

        uvloop.run(main(args.seconds, args.repeats, only, args.pairs))
    else:
        asyncio.run(main(args.seconds, args.repeats, only, args.pairs))
