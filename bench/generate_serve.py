"""Serving overhead of local generation: the OpenAI-compatible endpoint vs the engine itself.

    python bench/generate_serve.py            # SmolLM2 (model cache), 1, 4, 16 streams
    python bench/generate_serve.py --quick    # the tiny random Llama, seconds

Both sides run in one process on one event loop, on the same `Generator`, with the same
prompts (distinct per stream, ~100 tokens) and the same number of new tokens: (a) `direct`:
N tasks iterate `generator.generate(...)`; (b) `http`: N official `openai` clients stream
`/v1/chat/completions` over real HTTP (uvicorn, SSE) from the API server the daemon runs.
Measured per concurrency: aggregate completion tokens/s, time to first token p50/p99, and
the server process's CPU per generated token (engine + API server; the HTTP clients run in
a process of their own); the difference is what serving costs. Runs alternate
(direct, http) and the medians of `--repeats` runs are reported. Target: at 16 streams the
endpoint keeps >= 90% of the engine's aggregate tokens/s. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import AsyncOpenAI

from engine.generate import Generator
from gatewayd.api import ApiServer, ApiToken, Tokens, build_app

TOKEN = ApiToken("bench", "bench-secret-0123456789")
FILLER = (
    "The building has four floors. Each floor has a thermostat, a humidity sensor and two "
    "window contacts. The heating runs from six in the morning to ten at night. "
)


FILLERS = 2  # --quick: 0 (the tiny model's context is 128 tokens)


def messages(i: int) -> list[dict[str, str]]:
    return [
        {
            "role": "system",
            "content": f"You are the assistant of building {i}. " + FILLER * FILLERS,
        },
        {"role": "user", "content": f"Summarise the state of floor {i % 4 + 1} in one line."},
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else 0.0


async def direct_stream(generator: Generator, i: int, tokens: int, ttfts: list[float]) -> int:
    started, first, count = time.perf_counter(), None, 0
    async for delta in generator.generate(messages(i), max_tokens=tokens):
        if first is None and delta.text:
            first = time.perf_counter() - started
        count += len(delta.token_ids)
    ttfts.append(first or 0.0)
    return count


async def http_stream(api: AsyncOpenAI, i: int, tokens: int, ttfts: list[float]) -> int:
    started, first, count = time.perf_counter(), None, 0
    stream = await api.chat.completions.create(
        model="m", messages=messages(i), max_tokens=tokens, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    ttfts.append(first or 0.0)
    return count


async def http_client(base_url: str, streams: int, tokens: int) -> dict[str, Any]:
    """The client side, run in its own process (`--client`): N concurrent streams."""
    ttfts: list[float] = []
    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key=TOKEN.secret, max_retries=0) as api:
        await http_stream(api, 0, 1, [])  # the client's own first-call set-up is not measured
        print("go", flush=True)  # the server starts counting its CPU here
        wall = time.perf_counter()
        counts = await asyncio.gather(*(http_stream(api, i, tokens, ttfts) for i in range(streams)))
        wall = time.perf_counter() - wall
    return {"tokens": sum(counts), "wall_s": wall, "ttfts": ttfts}


async def one_run(
    kind: str, generator: Generator, base_url: str, streams: int, tokens: int
) -> dict[str, float]:
    cpu = time.process_time()  # this process: the engine's thread, the API server, (direct) callers
    if kind == "direct":
        ttfts: list[float] = []
        wall = time.perf_counter()
        counts = await asyncio.gather(
            *(direct_stream(generator, i, tokens, ttfts) for i in range(streams))
        )
        wall = time.perf_counter() - wall
        total = sum(counts)
        cpu_end = 0.0
    else:  # the clients in another process: their JSON parsing is not the server's cost
        client = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", base_url, str(streams), str(tokens),
            str(FILLERS), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert client.stdout is not None
        if (await client.stdout.readline()).strip() != b"go":
            raise RuntimeError("the benchmark client failed before its requests")
        cpu = time.process_time()  # not the fork/exec of the client, nor its warm-up call
        report = json.loads(await client.stdout.readline())
        cpu_end = time.process_time()
        if await client.wait() != 0:
            raise RuntimeError(f"the benchmark client failed ({client.returncode})")
        total, wall, ttfts = report["tokens"], report["wall_s"], report["ttfts"]
    cpu = (cpu_end if kind == "http" else time.process_time()) - cpu
    return {
        "tokens_per_s": total / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "server_cpu_ms_per_token": 1000 * cpu / max(total, 1),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    global FILLERS
    if args.quick:
        FILLERS = 0
        from engine.generate.build import convert
        from tests.engine.generate.tiny_llama import write_tiny_llama

        tmp = Path(tempfile.mkdtemp(prefix="bench-generate-serve-"))
        model_dir = convert(write_tiny_llama(tmp / "tiny.gguf"), tmp / "model")
        model = "tiny"
    else:
        from engine.generate.build import ensure_model

        model_dir = ensure_model("smollm2", progress=lambda m: print(m, file=sys.stderr))
        model = "smollm2"
    generator = Generator(model_dir, max_batch=max(args.streams))
    app, _ = build_app(SimpleNamespace(generators={"m": generator}, config=None), Tokens.of(TOKEN))
    server = ApiServer(app, "127.0.0.1", 0)
    await server.start()
    base_url = f"http://127.0.0.1:{server.port}"
    results: dict[str, Any] = {}
    try:
        await one_run("direct", generator, base_url, 1, 4)  # warm-up: sessions, allocations
        await one_run("http", generator, base_url, 1, 4)
        for streams in args.streams:
            runs: dict[str, list[dict[str, float]]] = {"direct": [], "http": []}
            for _ in range(args.repeats):
                for kind in ("direct", "http"):
                    run = await one_run(kind, generator, base_url, streams, args.tokens)
                    runs[kind].append(run)
                    print(f"{streams:>3} streams {kind:>6}: {run}", file=sys.stderr, flush=True)
            results[str(streams)] = {kind: median_of(r) for kind, r in runs.items()}
    finally:
        await server.stop(2)
        generator.close()
    print(
        f"{'streams':>7} {'side':>6} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'server cpu ms/tok':>17}"
    )
    for streams, sides in results.items():
        for side, r in sides.items():
            print(
                f"{streams:>7} {side:>6} {r['tokens_per_s']:8.1f} {r['ttft_p50_s']:9.3f} "
                f"{r['ttft_p99_s']:9.3f} {r['server_cpu_ms_per_token']:17.2f}"
            )
    top = results[str(max(args.streams))]
    ratio = top["http"]["tokens_per_s"] / top["direct"]["tokens_per_s"]
    return {
        "bench": "generate_serve",
        "model": model,
        "new_tokens": args.tokens,
        "repeats": args.repeats,
        "results": results,
        "http_over_direct_tokens_per_s_at_max_streams": round(ratio, 3),
        "target_http_over_direct_ge": 0.9,
        "target_met": ratio >= 0.9,
    }


def main() -> None:
    global FILLERS
    if sys.argv[1:2] == ["--client"]:
        base_url, streams, tokens, FILLERS = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(asyncio.run(http_client(base_url, streams, tokens))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 and 4 streams")
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per stream")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    args.streams = args.streams or ([1, 4] if args.quick else [1, 4, 16])
    args.tokens = args.tokens or (16 if args.quick else 48)
    args.repeats = args.repeats or (1 if args.quick else 3)
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
