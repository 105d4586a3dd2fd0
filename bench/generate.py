"""Benchmark: local LLM generation, continuous batching vs one request at a time.

    python bench/generate.py [--streams 1,4,16,64] [--prompt-tokens 200] [--new-tokens 64]
                             [--modes gatewayd,naive] [--threads 0] [--model-dir DIR]

The real SmolLM2-135M-Instruct (converted into the model cache on first use), same ONNX graph:
  gatewayd  Generator with continuous batching (max_batch 64): N streams share decoder calls
  naive     the same Generator with max_batch 1: requests run one at a time, in order
Each stream has its own ~200-token prompt, greedy, up to 64 new tokens (a stop token may end
one sooner: tokens are counted, not assumed). Prints a table, then one JSON line. Tokens per
CPU-second (this process's user+system time) is the figure to compare on a shared machine,
where wall-clock rates move with other jobs' load.
With --prefix-streams N (default 16): N streams sharing a ~500-token system prompt, each with
its own question, prefix cache off vs on (TTFT and CPU). First slice: no llama-cpp-python
column yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.generate import Generator
from engine.generate.build import ensure_model

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


async def run(generator: Generator, texts: list[str], new_tokens: int) -> dict[str, float]:
    cpu_started = time.process_time()
    started = time.perf_counter()
    ttft: list[float] = []
    produced: list[int] = []

    async def stream(text: str) -> None:
        count, first = 0, None
        async for delta in generator.generate(text, max_tokens=new_tokens):
            if first is None and delta.token_ids:
                first = time.perf_counter() - started
            count += len(delta.token_ids)
        ttft.append(first if first is not None else time.perf_counter() - started)
        produced.append(count)

    await asyncio.gather(*(stream(t) for t in texts))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return {
        "tok_s": sum(produced) / wall,
        "tok_per_cpu_s": sum(produced) / cpu,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tokens": float(sum(produced)),
        "wall_s": wall,
    }


def shared_prefix_prompts(generator: Generator, n: int, system_tokens: int) -> list[str]:
    ids = generator.encode(PARAGRAPH * (system_tokens // 30 + 2))[:system_tokens]
    system = "You are the building's assistant. Facts: " + generator.decode(ids)
    return [
        generator.render(
            [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]
        )
        for i in range(n)
    ]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", default="gatewayd,naive")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all)")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--prefix-streams", type=int, default=16)
    parser.add_argument("--prefix-new-tokens", type=int, default=16)
    args = parser.parse_args()
    model_dir = args.model_dir or ensure_model("smollm2", progress=print)
    streams = [int(s) for s in args.streams.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    startup_s = 0.0
    for mode in args.modes.split(","):
        started = time.perf_counter()
        generator = Generator(
            model_dir, max_batch=64 if mode == "gatewayd" else 1, intra_op_threads=args.threads
        )
        startup_s = max(startup_s, time.perf_counter() - started)
        try:
            await run(generator, prompts(generator, 1, 16), 4)  # warm-up
            results[mode] = {}
            for n in streams:
                texts = prompts(generator, n, args.prompt_tokens)
                results[mode][n] = await run(generator, texts, args.new_tokens)
                r = results[mode][n]
                print(
                    f"{mode:>9} {n:>4} streams: {r['tok_s']:7.1f} tok/s "
                    f"({r['tok_per_cpu_s']:6.1f} per CPU-s)  "
                    f"TTFT p50 {r['ttft_p50_s']:6.2f} s  p99 {r['ttft_p99_s']:6.2f} s  "
                    f"({r['tokens']:.0f} tokens in {r['wall_s']:.1f} s)",
                    flush=True,
                )
        finally:
            generator.close()
    line: dict[str, object] = {
        "bench": "generate",
        "model": "SmolLM2-135M-Instruct fp32 ONNX",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "startup_s": round(startup_s, 2),
    }
    for mode, by_n in results.items():
        for n, r in by_n.items():
            line[f"{mode}_{n}_tok_s"] = round(r["tok_s"], 1)
            line[f"{mode}_{n}_tok_per_cpu_s"] = round(r["tok_per_cpu_s"], 1)
            line[f"{mode}_{n}_ttft_p99_s"] = round(r["ttft_p99_s"], 2)
    for prefix_cache in (False, True) if args.prefix_streams else ():
        generator = Generator(
            model_dir, max_batch=64, prefix_cache=prefix_cache, intra_op_threads=args.threads
        )
        try:
            texts = shared_prefix_prompts(generator, args.prefix_streams, 500)
            r = await run(generator, texts, args.prefix_new_tokens)
        finally:
            generator.close()
        label = "prefix_on" if prefix_cache else "prefix_off"
        print(
            f"{label:>10} {args.prefix_streams} streams, shared 500-token system prompt: "
            f"{r['tok_s']:6.1f} tok/s ({r['tok_per_cpu_s']:6.1f} per CPU-s)  TTFT p50 "
            f"{r['ttft_p50_s']:6.2f} s  p99 {r['ttft_p99_s']:6.2f} s  ({r['wall_s']:.1f} s)",
            flush=True,
        )
        line[f"{label}_wall_s"] = round(r["wall_s"], 2)
        line[f"{label}_ttft_p99_s"] = round(r["ttft_p99_s"], 2)
        line[f"{label}_tok_per_cpu_s"] = round(r["tok_per_cpu_s"], 1)
    if "prefix_on_wall_s" in line:
        line["prefix_speedup"] = round(
            float(line["prefix_off_wall_s"]) / float(line["prefix_on_wall_s"]),
            2,  # type: ignore[arg-type]
        )
    if "gatewayd" in results and "naive" in results:
        shared = sorted(set(results["gatewayd"]) & set(results["naive"]))
        for n in shared:
            ratio = results["gatewayd"][n]["tok_s"] / results["naive"][n]["tok_s"]
            line[f"speedup_{n}_vs_naive"] = round(ratio, 2)
            per_cpu = results["gatewayd"][n]["tok_per_cpu_s"] / results["naive"][n]["tok_per_cpu_s"]
            line[f"cpu_speedup_{n}_vs_naive"] = round(per_cpu, 2)
    print(json.dumps(line))


if __name__ == "__main__":
    asyncio.run(main())
