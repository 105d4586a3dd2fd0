"""Chat streaming benchmark: concurrent chats through the real runtime and WebSocket listener.

    python bench/chat.py             # 1, 16, 64 chats; 200 tokens each at 50 tokens/s
    python bench/chat.py --quick     # smoke run (seconds)

Each chat is one agent with one WebSocket client; a scripted model yields text deltas at a
fixed token rate (each chunk carries the time it was produced). Measured: chunks/s delivered
to clients, p99 latency from the model yielding a chunk to the client receiving it, agent
commits per chunk, and process CPU per chunk. Variants, in the same run:

- `window` (the default, `stream_flush_s = 0.25`): each chunk is sent at once and stored
  within 0.25 s, one commit per window per chat;
- `stored-first` (`stream_flush_s = 0`): each batch stored, then sent (the output gate);
- `per-chunk` (the baseline): stored-first with `stream_batch_max_chunks = 1`, every chunk
  stored and sent in its own turn and commit.

Target: at 64 chats, commits <= chunks / 10 with p99 latency < 20 ms. Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import connect

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.chat import ChatAgent
from protocols.ws import WsListener, WsSettings


class PacedModel:
    def __init__(self, tokens: int, rate_per_s: float) -> None:
        self.tokens = tokens
        self.interval_s = 1.0 / rate_per_s

    async def stream(self, messages: Any, **_: Any) -> AsyncIterator[dict[str, Any]]:
        start = time.perf_counter()
        for i in range(self.tokens):
            delay = start + i * self.interval_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            yield {"type": "text-delta", "id": "t", "delta": "tok ", "at": time.perf_counter()}


class Window(ChatAgent):
    pass  # the default: stream_flush_s = 0.25


class StoredFirst(ChatAgent):
    stream_flush_s = 0


class PerChunk(ChatAgent):
    stream_flush_s = 0
    stream_batch_max_chunks = 1


VARIANTS: tuple[tuple[str, type[ChatAgent]], ...] = (
    ("window", Window),
    ("stored-first", StoredFirst),
    ("per-chunk", PerChunk),
)


async def one_chat(url: str, latencies: list[float]) -> int:
    received = 0
    async with connect(url, max_size=None) as ws:
        await ws.recv(), await ws.recv()  # identity, state
        message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "go"}]}
        await ws.send(json.dumps({"type": "gw.chat.send", "id": "r", "messages": [message]}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "gw.chat.done":
                return received
            if frame["type"] == "gw.chat.chunk" and "at" in frame["chunk"]:
                latencies.append(time.perf_counter() - frame["chunk"]["at"])
                received += 1


async def run(cls: type[ChatAgent], chats: int, tokens: int, rate: float) -> dict[str, Any]:
    cls.backend = PacedModel(tokens, rate)
    with tempfile.TemporaryDirectory() as state_dir:
        runtime = AgentRuntime(AgentSettings(state_dir=Path(state_dir)), {"chat": cls})
        await runtime.start()
        listener = WsListener(WsSettings(port=0), runtime)
        await listener.start()
        base = f"ws://127.0.0.1:{listener.bound_port}/agents/chat/"
        latencies: list[float] = []
        commits_before = runtime.stats()["commits_total"]
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        try:
            counts = await asyncio.gather(
                *(one_chat(base + str(i), latencies) for i in range(chats))
            )
        finally:
            wall = time.perf_counter() - wall_before
            cpu = time.process_time() - cpu_before
            commits = runtime.stats()["commits_total"] - commits_before
            await listener.stop()
            await runtime.close()
    chunks = sum(counts)
    latencies.sort()
    return {
        "chats": chats,
        "chunks": chunks,
        "chunks_per_s": round(chunks / wall, 1),
        "p50_latency_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_latency_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "commits_per_chunk": round(commits / chunks, 3),
        "cpu_us_per_chunk": round(cpu / chunks * 1e6, 1),
    }


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"tokens": opts.tokens, "rate_per_s": opts.rate, "runs": []}
    print(
        f"{'chats':>5} {'variant':>12} {'chunks/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'commits/chunk':>13} {'CPU us/chunk':>12}"
    )
    for chats in opts.chats:
        for name, cls in VARIANTS:
            row = await run(cls, chats, opts.tokens, opts.rate)
            results["runs"].append({"variant": name, **row})
            print(
                f"{chats:>5} {name:>12} {row['chunks_per_s']:>9} {row['p50_latency_ms']:>7} "
                f"{row['p99_latency_ms']:>7} {row['commits_per_chunk']:>13} "
                f"{row['cpu_us_per_chunk']:>12}"
            )
    at_64 = {r["variant"]: r for r in results["runs"] if r["chats"] == max(opts.chats)}
    window = at_64["window"]
    results["target"] = (
        f"window at {max(opts.chats)} chats: commits <= chunks/10 and p99 < 20 ms "
        "(baseline: per-chunk, every chunk in its own commit)"
    )
    results["commit_reduction_vs_chunks"] = round(1 / max(window["commits_per_chunk"], 1e-9), 1)
    results["target_met"] = window["commits_per_chunk"] <= 0.1 and window["p99_latency_ms"] < 20.0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per chat")
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.quick:
        opts.chats, opts.tokens = [1, 8], 40
    print(json.dumps({"bench": "chat", **asyncio.run(main_async(opts))}))


if __name__ == "__main__":
    main()
