"""Client library and dashboard sampler costs.

    python bench/clients.py            # 2000 RPCs per variant, 2000 samples
    python bench/clients.py --quick    # smoke run (seconds)

1. RPC round trip through the real runtime and WebSocket listener (the example thermostat's
   `set_target`, one call at a time): `gatewayd.client.AgentClient.call` against the baseline
   of raw `websockets` frames written and matched by hand. Medians and p99 in microseconds.
2. The dashboard's sampler: one `Sampler.sample()` over the process's real Prometheus registry
   (agents, MQTT, TCP, engine metrics registered) against the baseline of collecting the
   registry alone; and what sampling once a second costs of one core.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import REGISTRY
from websockets.asyncio.client import connect

import engine.metrics  # noqa: F401  (registers the engine's series, as in the daemon)
import protocols.mqtt
import protocols.tcp  # noqa: F401
from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.client import AgentClient
from gatewayd.dashboard.sampler import Sampler
from gatewayd.examples.thermostat import Thermostat
from protocols.ws import WsListener, WsSettings


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def raw_calls(url: str, n: int) -> list[float]:
    times = []
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # identity
        await ws.recv()  # state
        for i in range(n):
            started = time.perf_counter()
            await ws.send(
                json.dumps(
                    {"type": "gw.rpc", "id": i, "method": "set_target", "args": [20 + i % 5]}
                )
            )
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("type") == "gw.rpc_result" and frame["id"] == str(i):
                    break
            times.append((time.perf_counter() - started) * 1e6)
    return times


async def client_calls(base: str, n: int) -> list[float]:
    times = []
    async with AgentClient(base, "thermostat", "bench-client") as agent:
        for i in range(n):
            started = time.perf_counter()
            await agent.call("set_target", 20 + i % 5)
            times.append((time.perf_counter() - started) * 1e6)
    return times


async def rpc_bench(n: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as state:
        runtime = AgentRuntime(AgentSettings(state_dir=Path(state)), {"thermostat": Thermostat})
        await runtime.start()
        listener = WsListener(WsSettings(port=0), runtime)
        await listener.start()
        base = f"ws://127.0.0.1:{listener.bound_port}"
        try:
            runs = []
            # Interleaved rounds, so load on the shared machine hits both variants alike.
            raw: list[float] = []
            lib: list[float] = []
            for _ in range(4):
                raw += await raw_calls(f"{base}/agents/thermostat/bench-raw", n // 4)
                lib += await client_calls(base, n // 4)
            for name, times in (("raw websockets (baseline)", raw), ("AgentClient.call", lib)):
                runs.append(
                    {
                        "variant": name,
                        "calls": len(times),
                        "p50_us": round(statistics.median(times), 1),
                        "p99_us": round(pct(times, 0.99), 1),
                        "calls_per_s": round(len(times) / (sum(times) / 1e6), 1),
                    }
                )
            return runs
        finally:
            await listener.stop()
            await runtime.close()


def sampler_bench(n: int) -> list[dict[str, Any]]:
    sampler = Sampler(types.SimpleNamespace(transports={}, runtime=None), interval_s=1.0)
    collect, sample = [], []
    for _ in range(n):
        started = time.perf_counter()
        for family in REGISTRY.collect():
            family.samples  # noqa: B018
        collect.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        sampler.sample()
        sample.append((time.perf_counter() - started) * 1e6)
    return [
        {"variant": "registry.collect() (baseline)", "p50_us": round(statistics.median(collect), 1),
         "p99_us": round(pct(collect, 0.99), 1)},
        {"variant": "Sampler.sample()", "p50_us": round(statistics.median(sample), 1),
         "p99_us": round(pct(sample, 0.99), 1),
         "core_share_at_1hz_pct": round(statistics.median(sample) / 1e6 * 100, 4)},
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    calls, samples = (200, 200) if args.quick else (2000, 2000)
    rpc = asyncio.run(rpc_bench(calls))
    sampling = sampler_bench(samples)
    print(f"{'RPC round trip':34} {'calls':>6} {'p50 µs':>9} {'p99 µs':>9} {'calls/s':>9}")
    for run in rpc:
        print(
            f"{run['variant']:34} {run['calls']:>6} {run['p50_us']:>9} {run['p99_us']:>9} {run['calls_per_s']:>9}"
        )
    print(f"\n{'dashboard sampling':34} {'p50 µs':>9} {'p99 µs':>9}")
    for run in sampling:
        print(f"{run['variant']:34} {run['p50_us']:>9} {run['p99_us']:>9}")
    overhead = rpc[1]["p50_us"] / rpc[0]["p50_us"]
    sample_us = sampling[1]["p50_us"]
    result = {
        "bench": "clients",
        "quick": args.quick,
        "rpc": rpc,
        "sampler": sampling,
        "client_p50_vs_raw": round(overhead, 3),
        "target": "AgentClient.call p50 <= 1.25 x raw frames; one sample < 1 ms (< 0.1% of a core at 1 Hz)",
        "target_met": overhead <= 1.25 and sample_us < 1000,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
