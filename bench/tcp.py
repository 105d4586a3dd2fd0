"""TCP binary frames through the REAL daemon: 1,000 connected devices, a state write per frame.

A `gatewayd run` child process serves `[listeners.binary]` with the `FrameCounter` agent
(bench/gateway_agents.py: one small SQL insert + one `set_state` per DATA frame, durability
`normal`); every device is its own agent with its own SQLite file. The load generator
(bench/tcp_load.py `run_load`, in this process) connects all devices, then streams pipelined
DATA frames (`--window` unacked per device) and measures each frame's send -> ACK latency and
its own encode cost. A warm-up pass first wakes every agent (creates its database), so the
measured pass is the steady state; the daemon's CPU (utime+stime, all threads) is read around
the measured pass.

Baseline in the same run: tcp_load's `null` gateway (TcpListener + a handler that resolves
every frame at once: transport + codec only, no agent, no storage), in its own child process.

    python bench/tcp.py                          # 1,000 devices, ~1 min
    python bench/tcp.py --devices 1000 --frames 100 --window 8 --repeats 3

Targets (issue #4): >= 30,000 acknowledged frames/s and ack p99 < 10 ms against the daemon.
Prints a table, then one JSON line (medians over --repeats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._gateway import GatewayDaemon  # noqa: E402
from bench.tcp_load import LoadResult, _bench_devices, _measure_child, run_load  # noqa: E402
from tests.brokers import free_port  # noqa: E402

TARGET_FRAMES_PER_S = 30_000.0
TARGET_P99_MS = 10.0

GATEWAY_CONFIG = """
[gateway]
state_dir = "state"
log_level = "warning"
drain_timeout = "10s"
[http]
enabled = false
[agents]
durability = "{durability}"
python_path = ["{repo}"]
hibernate_after = "10m"
[agents.classes.frames]
class = "bench.gateway_agents:FrameCounter"
[listeners.websocket]
enabled = false
[listeners.binary]
enabled = true
bind = "127.0.0.1:{port}"
agent_class = "frames"
secrets_file = "devices.toml"
max_unacked = {max_unacked}
max_connections = {max_connections}
[mqtt]
enabled = false
"""


def secrets_toml(devices: list[tuple[str, str]]) -> str:
    return "".join(f'"{device_id}" = "{secret}"\n' for device_id, secret in devices)


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def measure_gateway(
    daemon: GatewayDaemon, port: int, args: argparse.Namespace, first_seq: int
) -> tuple[LoadResult, float]:
    """One measured pass; returns the load result and the daemon's CPU seconds during it."""
    devices = _bench_devices(args.devices)
    cpu_before = daemon.cpu_s()
    result = _run(
        run_load(
            "127.0.0.1", port, devices, frames_per_device=args.frames, window=args.window,
            payload_bytes=args.payload_bytes, first_seq=first_seq,
        )
    )  # fmt: skip
    return result, daemon.cpu_s() - cpu_before


def summary(result: LoadResult, cpu_s: float | None = None) -> dict[str, Any]:
    s = result.summary()
    if cpu_s is not None:
        s["gateway_cpu_us_per_frame"] = round(cpu_s * 1e6 / max(1, result.frames_acked), 1)
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=60, help="DATA frames per device per pass")
    parser.add_argument("--window", type=int, default=8, help="unacked frames per device")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--warmup-frames", type=int, default=5, help="per device, before measuring")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--durability", default="normal", choices=("normal", "full"))
    args = parser.parse_args()

    devices = _bench_devices(args.devices)
    port = free_port()
    config = GATEWAY_CONFIG.format(
        durability=args.durability, repo=REPO, port=port, max_unacked=max(64, args.window),
        max_connections=args.devices + 100,
    )  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"null": [], "gateway": []}
    started = time.monotonic()
    with GatewayDaemon(config, files={"devices.toml": secrets_toml(devices)}) as daemon:
        warm = _run(
            run_load("127.0.0.1", port, devices, frames_per_device=args.warmup_frames,
                     window=args.window, payload_bytes=args.payload_bytes)
        )  # fmt: skip
        if warm.errors:
            raise SystemExit(f"warm-up failed: {warm.errors[:3]}\n{daemon.log_tail()}")
        next_seq = args.warmup_frames + 1
        for repeat in range(args.repeats):
            runs["null"].append(summary(_measure_child("null", args)))
            result, cpu_s = measure_gateway(daemon, port, args, next_seq)
            next_seq += args.frames
            runs["gateway"].append(summary(result, cpu_s))
            for kind in ("null", "gateway"):
                r = runs[kind][-1]
                print(f"  repeat {repeat + 1} {kind}: {r['frames_per_s']:.0f} frames/s, "
                      f"p99 {r['ack_p99_ms']} ms, errors {r['errors']}",
                      file=sys.stderr, flush=True)  # fmt: skip
            for error in result.errors[:3]:
                print(f"  error (gateway): {error}", file=sys.stderr)
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise SystemExit(f"gatewayd died: {daemon.log_tail()}")

    medians = {
        kind: {key: round(statistics.median(r[key] for r in rs), 3) for key in rs[0]}
        for kind, rs in runs.items()
    }
    print(
        f"{'gateway side':<22}{'frames/s':>10}{'ack p50 ms':>12}{'ack p99 ms':>12}"
        f"{'enc us/fr':>11}{'gw cpu us/fr':>14}{'errors':>8}"
    )
    labels = {"null": "null (baseline)", "gateway": f"gatewayd ({args.durability})"}
    for kind, m in medians.items():
        print(
            f"{labels[kind]:<22}{m['frames_per_s']:>10.0f}{m['ack_p50_ms']:>12.2f}"
            f"{m['ack_p99_ms']:>12.2f}{m['client_encode_us_per_frame']:>11.2f}"
            f"{m.get('gateway_cpu_us_per_frame', float('nan')):>14.1f}{m['errors']:>8.0f}"
        )
    gw, base = medians["gateway"], medians["null"]
    output = {
        "bench": "tcp",
        "devices": args.devices,
        "frames_per_device": args.frames,
        "window": args.window,
        "payload_bytes": args.payload_bytes,
        "durability": args.durability,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - started, 1),
        "median": medians,
        "gateway_vs_null_frames_per_s": round(gw["frames_per_s"] / base["frames_per_s"], 3)
        if base["frames_per_s"]
        else None,
        "targets": {
            "frames_per_s_min": TARGET_FRAMES_PER_S,
            "ack_p99_ms_max": TARGET_P99_MS,
            "frames_per_s_met": gw["frames_per_s"] >= TARGET_FRAMES_PER_S,
            "ack_p99_met": gw["ack_p99_ms"] < TARGET_P99_MS,
        },
        "runs": runs,
    }
    print(json.dumps(output))


if __name__ == "__main__":
    main()
