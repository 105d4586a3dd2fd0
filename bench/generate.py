"""Benchmark: local LLM generation, continuous batching vs one request at a time vs llama.cpp.

    python bench/generate.py [--streams 1,4,16,64] [--prompt-tokens 200] [--new-tokens 64]
                             [--modes gatewayd,naive,llamacpp] [--sequential-max 16]
                             [--threads 2] [--replicas 1] [--weights fp32] [--model-dir DIR]
                             [--stop-at-eos] [--write]

The real SmolLM2-135M-Instruct (converted into the model cache on first use), side by side:
  gatewayd  Generator with continuous batching (max_batch 64, chunked prefill, paged KV):
            N streams share decoder calls
  naive     the same Generator and ONNX graph with max_batch 1: requests one at a time
  llamacpp  llama-cpp-python on the same GGUF (Q4_1), one request at a time (its Python
            binding does not batch requests), in its own environment: bench/setup_llamacpp.sh
            creates bench/.venv-llamacpp; absent, the column says so
Each stream has its own ~200-token chat prompt, greedy, exactly 64 new tokens (the model's
stop tokens are ignored, in llama.cpp by a logit bias, as vLLM's benchmarks do with
ignore_eos: SmolLM2 would end most answers near 40; --stop-at-eos lets it, and tokens are
counted, not assumed). All N requests arrive at once; TTFT is from
then (so a queued request's wait counts). tok/s is generated tokens / wall seconds of the
whole run (prefill included); tok/CPU-s divides by this process's user+system CPU time (the
figure to compare on a shared machine, where wall-clock rates move with other jobs' load).
naive and llamacpp serve one request at a time, so their tok/s does not depend on N; they run
up to --sequential-max streams (TTFT beyond that grows linearly and is not measured).
Also: 16 streams sharing a ~500-token system prompt, prefix cache off vs on; KV memory per
sequence; start-up to ready (a fresh process: imports, session load, first token).
Prints a table and one JSON line; --write saves bench/results/generate.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.generate import Generator
from engine.generate.build import default_cache_dir, ensure_model, fetch_gguf

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_PYTHON = ROOT / "bench" / ".venv-llamacpp" / "bin" / "python"
PARAGRAPH = (
    "The gateway collects readings from thermostats, door sensors and air-quality monitors "
    "across the building, keeps each device's state in its own agent, and answers questions "
    "from the staff about what happened overnight. "
)


def prompts(generator: Generator, n: int, tokens: int) -> list[str]:
    out = []
    for i in range(n):
        text = f"Report {i}: " + PARAGRAPH * (tokens // 30 + 2)
        ids = generator.encode(text)[: tokens - 12]
        question = generator.decode(ids) + "\nSummarise the report above in one sentence."
        out.append(generator.render([{"role": "user", "content": question}]))
    return out


def summary(tokens: int, wall: float, cpu: float, ttft: list[float]) -> dict[str, float]:
    return {
        "tok_s": tokens / wall,
        "tok_per_cpu_s": tokens / cpu if cpu > 0 else 0.0,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tokens": float(tokens),
        "wall_s": wall,
    }


IGNORE_EOS = True  # set from --stop-at-eos in main()


async def run(generator: Generator, texts: list[str], new_tokens: int) -> dict[str, float]:
    cpu_started = time.process_time()
    started = time.perf_counter()
    ttft: list[float] = []
    produced: list[int] = []

    async def stream(text: str) -> None:
        count, first = 0, None
        async for delta in generator.generate(text, max_tokens=new_tokens, ignore_eos=IGNORE_EOS):
            if first is None and delta.token_ids:
                first = time.perf_counter() - started
            count += len(delta.token_ids)
        ttft.append(first if first is not None else time.perf_counter() - started)
        produced.append(count)

    await asyncio.gather(*(stream(t) for t in texts))
    return summary(
        sum(produced), time.perf_counter() - started, time.process_time() - cpu_started, ttft
    )


def shared_prefix_prompts(generator: Generator, n: int, system_tokens: int) -> list[str]:
    ids = generator.encode(PARAGRAPH * (system_tokens // 30 + 2))[:system_tokens]
    system = "You are the building's assistant. Facts: " + generator.decode(ids)
    return [
        generator.render(
            [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]
        )
        for i in range(n)
    ]


def llamacpp(
    gguf: Path, runs: list[list[str]], new_tokens: int, threads: int, ban: list[int]
) -> dict | None:
    """llama-cpp-python's results for `runs`, or None when its environment is absent."""
    if not LLAMACPP_PYTHON.exists():
        return None
    probe = subprocess.run([str(LLAMACPP_PYTHON), "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:  # the environment is there, the package not (yet)
        return None
    job = {
        "gguf": str(gguf),
        "threads": threads,
        "new_tokens": new_tokens,
        "runs": runs,
        "ban": ban,
    }
    done = subprocess.run(
        [str(LLAMACPP_PYTHON), str(ROOT / "bench" / "_llamacpp_worker.py")],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def startup_s(model_dir: Path, threads: int) -> dict[str, float]:
    """A fresh process: import, load the converted model, first token of a short prompt."""
    code = (
        "import time; t0 = time.perf_counter(); import asyncio, sys; "
        f"sys.path.insert(0, {str(ROOT)!r}); from engine.generate import Generator; "
        f"g = Generator(__import__('pathlib').Path({str(model_dir)!r}), intra_op_threads={threads}); "
        "t1 = time.perf_counter()\n"
        "async def first():\n"
        "    async for d in g.generate('Hello', max_tokens=1): pass\n"
        "asyncio.run(first()); t2 = time.perf_counter(); g.close(); print(t1 - t0, t2 - t0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ready, first = (float(x) for x in out.stdout.split())
    return {"ready_s": ready, "first_token_s": first}


def row(label: str, n: int, r: dict[str, float]) -> str:
    return (
        f"| {label} | {n} | {r['tok_s']:.1f} | {r['tok_per_cpu_s']:.1f} | {r['ttft_p50_s']:.2f} "
        f"| {r['ttft_p99_s']:.2f} | {r['tokens']:.0f} | {r['wall_s']:.1f} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", default="gatewayd,naive,llamacpp")
    parser.add_argument("--sequential-max", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="gatewayd decoder replicas, threads // replicas threads each (naive and "
        "llama.cpp use --threads in one session)",
    )
    parser.add_argument("--weights", default="fp32", choices=("fp32", "q4"))
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--prefix-streams", type=int, default=16)
    parser.add_argument("--prefix-new-tokens", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="save bench/results/generate.*")
    parser.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="let the model end answers (default: exactly --new-tokens each, as vLLM's ignore_eos)",
    )
    args = parser.parse_args()
    global IGNORE_EOS
    IGNORE_EOS = not args.stop_at_eos
    model_dir = args.model_dir or ensure_model("smollm2", progress=print, weights=args.weights)
    streams = [int(s) for s in args.streams.split(",")]
    modes = args.modes.split(",")
    results: dict[str, dict[int, dict[str, float]]] = {}
    table: list[str] = []
    notes: list[str] = []
    line: dict[str, object] = {
        "bench": "generate",
        "model": f"SmolLM2-135M-Instruct {args.weights} ONNX (llama.cpp: the Q4_1 GGUF)",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "ignore_eos": IGNORE_EOS,
        "threads": args.threads,
        "gatewayd_replicas": args.replicas,
        "load_avg_start": round(os.getloadavg()[0], 1),
    }
    start = startup_s(model_dir, args.threads)
    line["startup_ready_s"] = round(start["ready_s"], 2)
    line["startup_first_token_s"] = round(start["first_token_s"], 2)
    print(f"start-up: ready {start['ready_s']:.2f} s, first token {start['first_token_s']:.2f} s")
    texts_by_n: dict[int, list[str]] = {}
    for mode in [m for m in modes if m in ("gatewayd", "naive")]:
        # a pool that holds every stream at once (64 x 264 tokens: 780 MB), so the figure is
        # batching's, not preemption's
        kv_tokens = max(8192, max(streams) * (args.prompt_tokens + args.new_tokens + 32))
        batched = mode == "gatewayd"
        generator = Generator(
            model_dir,
            max_batch=64 if batched else 1,
            intra_op_threads=max(1, args.threads // args.replicas) if batched else args.threads,
            kv_cache_tokens=kv_tokens,
            replicas=args.replicas if batched else 1,
        )
        try:
            await run(generator, prompts(generator, 1, 16), 4)  # warm-up
            results[mode] = {}
            for n in streams:
                if mode == "naive" and n > args.sequential_max:
                    continue
                texts_by_n[n] = prompts(generator, n, args.prompt_tokens)
                r = results[mode][n] = await run(generator, texts_by_n[n], args.new_tokens)
                table.append(row(mode, n, r))
                print(table[-1], flush=True)
            if mode == "gatewayd":
                line["kv_bytes_per_token"] = generator.kv_bytes_per_token
                line["kv_mib_per_sequence"] = round(
                    generator.kv_bytes_per_token * (args.prompt_tokens + args.new_tokens) / 2**20,
                    1,
                )
                stats = generator.stats()
                line["gatewayd_preemptions"] = stats.preemptions_total
                line["gatewayd_inter_token_p50_s"] = round(stats.inter_token_p50_s, 3)
                line["gatewayd_inter_token_p99_s"] = round(stats.inter_token_p99_s, 3)
        finally:
            generator.close()
    if "llamacpp" in modes:
        wanted = [n for n in streams if n <= args.sequential_max]
        if any(n not in texts_by_n for n in wanted):
            helper = Generator(model_dir, max_batch=1, intra_op_threads=1)
            texts_by_n.update({n: prompts(helper, n, args.prompt_tokens) for n in wanted})
            helper.close()
        gguf = fetch_gguf("smollm2", default_cache_dir())
        probe = Generator(model_dir, max_batch=1, intra_op_threads=1)
        ban = sorted(probe.stop_token_ids) if IGNORE_EOS else []
        probe.close()
        got = llamacpp(gguf, [texts_by_n[n] for n in wanted], args.new_tokens, args.threads, ban)
        if got is None:
            notes.append(
                "llama-cpp-python: not installed (bench/setup_llamacpp.sh creates "
                "bench/.venv-llamacpp); no column"
            )
            print(notes[-1])
        else:
            results["llamacpp"] = {}
            line["llamacpp_load_s"] = round(got["load_s"], 2)
            for n, g in zip(wanted, got["results"], strict=True):
                r = results["llamacpp"][n] = summary(
                    g["tokens"], g["wall_s"], g["cpu_s"], g["ttft"]
                )
                table.append(row("llama-cpp-python", n, r))
                print(table[-1], flush=True)
    for mode, by_n in results.items():
        for n, r in by_n.items():
            line[f"{mode}_{n}_tok_s"] = round(r["tok_s"], 1)
            line[f"{mode}_{n}_tok_per_cpu_s"] = round(r["tok_per_cpu_s"], 1)
            line[f"{mode}_{n}_ttft_p99_s"] = round(r["ttft_p99_s"], 2)
    prefix_rows = []
    for prefix_cache in (False, True) if args.prefix_streams else ():
        generator = Generator(
            model_dir,
            max_batch=64,
            prefix_cache=prefix_cache,
            intra_op_threads=max(1, args.threads // args.replicas),
            replicas=args.replicas,
        )
        try:
            texts = shared_prefix_prompts(generator, args.prefix_streams, 500)
            r = await run(generator, texts, args.prefix_new_tokens)
        finally:
            generator.close()
        label = "prefix_on" if prefix_cache else "prefix_off"
        prefix_rows.append(row(f"{label} (shared 500-token system prompt)", args.prefix_streams, r))
        print(prefix_rows[-1], flush=True)
        line[f"{label}_wall_s"] = round(r["wall_s"], 2)
        line[f"{label}_ttft_p99_s"] = round(r["ttft_p99_s"], 2)
        line[f"{label}_tok_per_cpu_s"] = round(r["tok_per_cpu_s"], 1)
    if "prefix_on_wall_s" in line:
        off, on = float(line["prefix_off_wall_s"]), float(line["prefix_on_wall_s"])  # type: ignore[arg-type]
        line["prefix_speedup"] = round(off / on, 2)
    targets = {}
    for base in ("naive", "llamacpp"):
        if "gatewayd" not in results or base not in results:
            continue
        for n in sorted(set(results["gatewayd"]) & set(results[base])):
            g, b = results["gatewayd"][n], results[base][n]
            line[f"speedup_{n}_vs_{base}"] = round(g["tok_s"] / b["tok_s"], 2)
            line[f"cpu_speedup_{n}_vs_{base}"] = round(g["tok_per_cpu_s"] / b["tok_per_cpu_s"], 2)
    g16 = results.get("gatewayd", {}).get(16)
    if g16:
        if "speedup_16_vs_naive" in line:
            targets["4x_naive_at_16"] = float(line["speedup_16_vs_naive"]) >= 4  # type: ignore[arg-type]
        if "speedup_16_vs_llamacpp" in line:
            targets["1.5x_llamacpp_at_16"] = float(line["speedup_16_vs_llamacpp"]) >= 1.5  # type: ignore[arg-type]
        targets["ttft_p99_16_under_1s"] = g16["ttft_p99_s"] < 1.0
    targets["startup_under_4s"] = start["ready_s"] < 4.0
    line["targets_met"] = targets
    line["load_avg_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(line))
    if args.write:
        out = ROOT / "bench" / "results"
        (out / "generate.json").write_text(json.dumps(line) + "\n")
        md = [
            "# bench/generate.py",
            "",
            f"`python bench/generate.py {' '.join(sys.argv[1:])}`; load average at start "
            f"{line['load_avg_start']}, at end {line['load_avg_end']} (2 shared vCPUs).",
            "",
            "| engine | streams | tok/s | tok/CPU-s | TTFT p50 s | TTFT p99 s | tokens | wall s |",
            "|---|---|---|---|---|---|---|---|",
            *table,
            *prefix_rows,
            "",
            f"Start-up to ready {start['ready_s']:.2f} s (first token {start['first_token_s']:.2f} s); "
            f"KV {line.get('kv_bytes_per_token')} bytes a token, "
            f"{line.get('kv_mib_per_sequence')} MiB a {args.prompt_tokens}+{args.new_tokens}-token sequence.",
            *(f"\n{n}" for n in notes),
            "",
            "```json",
            json.dumps(line),
            "```",
            "",
        ]
        (out / "generate.md").write_text("\n".join(md))


if __name__ == "__main__":
    asyncio.run(main())
