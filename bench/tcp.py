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
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._gateway import CLOCK_TICKS_PER_S, GatewayDaemon  # noqa: E402
from bench.tcp_load import LoadResult, _bench_devices, run_load  # noqa: E402
from protocols.frames import (  # noqa: E402
    Ack,
    Close,
    Data,
    Error,
    FrameDecoder,
    Hello,
    HelloOk,
    Ping,
    Pong,
    encode,
)
from tests.brokers import free_port  # noqa: E402

TARGET_FRAMES_PER_S = 30_000.0
TARGET_P99_MS = 10.0

GATEWAY_CONFIG = """
[gateway]
state_dir = "state"
log_level = "warning"
drain_timeout = "10s"
[http]
enabled = true
bind = "127.0.0.1:{http_port}"
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


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


class NullGateway:
    """tcp_load's `null` gateway side (TcpListener + resolve-at-once handler) as a child."""

    def __init__(self, device_count: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tcp-null-")
        self.child = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "tcp_load.py"), "--serve", "null",
             "--devices", str(device_count), "--state-dir", self._tmp.name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line.startswith("PORT "):
            self.close()
            raise SystemExit(f"null gateway child did not start: {line!r}")
        self.port = int(line.split()[1])

    def close(self) -> None:
        if self.child.stdin is not None:
            self.child.stdin.close()  # the child stops when its stdin closes
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        self._tmp.cleanup()


class _PacedDevice:
    """One connected device for the paced (open-loop) pass."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int):
        self.reader, self.writer, self.window = reader, writer, window
        self.sent_at: dict[int, float] = {}
        self.decoder = FrameDecoder()
        self.next_seq = 0


async def _connect(host: str, port: int, device_id: str, secret: str, window: int) -> _PacedDevice:
    reader, writer = await asyncio.open_connection(host, port)
    device = _PacedDevice(reader, writer, window)
    writer.write(encode(Hello(device_id, secret, "bench/tcp paced")))
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError(f"{device_id}: closed before HELLO_OK")
        for frame in device.decoder.feed(data):
            if isinstance(frame, HelloOk):
                device.window = min(window, frame.max_unacked)
                return device
            if isinstance(frame, Error):
                raise ConnectionError(f"{device_id}: {frame.code} {frame.message}")


async def paced_load(
    host: str, port: int, devices: list[tuple[str, str]], *, rate_per_s: float, duration_s: float,
    warmup_s: float, first_seq: int, window: int, payload_bytes: int, cpu: Any = None,
) -> tuple[dict[str, Any], int]:  # fmt: skip
    """Open loop: DATA frames at `rate_per_s` in total, round robin over the devices.

    A device with `window` frames unacked is skipped (counted in `skipped`): the offered rate
    is then not met, which the result shows. Returns the summary and the next free seq.
    """
    connected = await asyncio.gather(
        *(_connect(host, port, d, s, window) for d, s in devices), return_exceptions=True
    )
    errors = [str(c) for c in connected if isinstance(c, BaseException)]
    conns = [c for c in connected if isinstance(c, _PacedDevice)]
    payload = os.urandom(payload_bytes)
    clock = time.perf_counter
    latencies_s: list[float] = []
    counting = False
    acked = skipped = encode_ns = encoded = 0

    async def read(device: _PacedDevice) -> None:
        nonlocal acked
        try:
            while data := await device.reader.read(65536):
                now = clock()
                for frame in device.decoder.feed(data):
                    if isinstance(frame, Ack):
                        sent = device.sent_at.pop(frame.seq, None)
                        if sent is not None and counting:
                            latencies_s.append(now - sent)
                            acked += 1
                    elif isinstance(frame, Ping):
                        device.writer.write(encode(Pong(frame.seq)))
                    elif isinstance(frame, Error | Close):
                        errors.append(repr(frame))
        except OSError as exc:
            errors.append(str(exc))

    for c in conns:
        c.next_seq = first_seq

    async def pace() -> None:
        nonlocal skipped, encode_ns, encoded
        began = clock()
        due = 0
        turn = 0
        while True:
            await asyncio.sleep(0.002)
            target = int((clock() - began) * rate_per_s)
            while due < target:
                due += 1
                for _ in range(len(conns)):
                    device = conns[turn % len(conns)]
                    turn += 1
                    if len(device.sent_at) < device.window:
                        break
                else:
                    skipped += 1
                    continue
                t0 = time.perf_counter_ns()
                frame = encode(Data(device.next_seq, payload))
                encode_ns += time.perf_counter_ns() - t0
                encoded += 1
                device.sent_at[device.next_seq] = clock()
                device.next_seq += 1
                device.writer.write(frame)

    readers = [asyncio.create_task(read(c)) for c in conns]
    pacer = asyncio.create_task(pace())
    await asyncio.sleep(warmup_s)
    cpu_before = cpu() if cpu else None
    counting, started = True, clock()
    await asyncio.sleep(duration_s)
    counting, elapsed_s = False, clock() - started
    cpu_after = cpu() if cpu else None
    pacer.cancel()
    # Seqs must stay contiguous per device (the gateway never applies a seq past a missing
    # one): bring every device to the same next seq, then wait until everything is ACKed.
    top = max((c.next_seq for c in conns), default=first_seq)
    deadline = clock() + 60
    while clock() < deadline and any(c.sent_at or c.next_seq < top for c in conns):
        for c in conns:
            while c.next_seq < top and len(c.sent_at) < c.window:
                c.sent_at[c.next_seq] = clock()
                c.writer.write(encode(Data(c.next_seq, payload)))
                c.next_seq += 1
        await asyncio.sleep(0.005)
    unacked = sum(len(c.sent_at) for c in conns)
    if unacked:
        errors.append(f"{unacked} frames still unacked 60 s after the paced pass")
    for c in conns:
        c.writer.write(encode(Close(1000, "bench done")))
        c.writer.close()
    for task in readers:
        task.cancel()
    await asyncio.gather(pacer, *readers, return_exceptions=True)
    latencies_s.sort()

    def q_ms(q: float) -> float:
        if not latencies_s:
            return float("nan")
        return round(1000 * latencies_s[min(len(latencies_s) - 1, int(q * len(latencies_s)))], 3)

    result: dict[str, Any] = {
        "offered_frames_per_s": round(rate_per_s, 1),
        "frames_per_s": round(acked / elapsed_s, 1),
        "ack_p50_ms": q_ms(0.50),
        "ack_p99_ms": q_ms(0.99),
        "skipped_window_full": skipped,
        "client_encode_us_per_frame": round(encode_ns / 1000 / max(1, encoded), 3),
        "errors": len(errors),
    }
    if errors:
        result["error_samples"] = sorted(set(errors))[:3]
    if cpu_before is not None and cpu_after is not None:
        result["gateway_cpu_us_per_frame"] = round(
            (cpu_after - cpu_before) * 1e6 / max(1, acked), 1
        )
    return result, top


def daemon_counters(http_port: int) -> dict[str, float]:
    """A few of the daemon's own counters (from /metrics) that explain a slow run."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = (
        "gatewayd_agent_wakes_total", "gatewayd_agent_hibernations_total",
        "gatewayd_agent_commits_total", "gatewayd_agent_commit_errors_total",
        "gatewayd_agent_turns_total",
    )  # fmt: skip
    counters: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split(" ", 1)[0]
        if name.split("{", 1)[0] in wanted:
            counters[name] = float(line.rsplit(" ", 1)[1])
    return counters


def phase_name(fraction: float) -> str:
    return f"paced_{round(fraction * 100)}pct"


def summary(result: LoadResult, cpu_s: float) -> dict[str, Any]:
    s = result.summary()
    s["gateway_cpu_us_per_frame"] = round(cpu_s * 1e6 / max(1, result.frames_acked), 1)
    if result.errors:
        s["error_samples"] = sorted(set(result.errors))[:3]
    return s


def closed_loop(
    port: int, devices: list[tuple[str, str]], args: argparse.Namespace, first_seq: int, pid: int
) -> dict[str, Any]:
    """tcp_load.run_load (all devices, `--window` pipelined each) with the server's CPU."""
    cpu_before = proc_cpu_s(pid)
    result = _run(
        run_load(
            "127.0.0.1", port, devices, frames_per_device=args.frames, window=args.window,
            payload_bytes=args.payload_bytes, first_seq=first_seq,
        )
    )  # fmt: skip
    # Includes the pass's HELLOs (connects): an upper bound of the per-frame cost.
    return summary(result, proc_cpu_s(pid) - cpu_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=60, help="DATA frames per device (max pass)")
    parser.add_argument("--window", type=int, default=8, help="unacked frames per device")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--warmup-frames", type=int, default=5, help="per device, before measuring")
    parser.add_argument("--paced-s", type=float, default=4.0, help="measured window per paced pass")
    parser.add_argument(
        "--paced", default="0.5,0.1", help="open-loop passes at these fractions of the max rate"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--durability", default="normal", choices=("normal", "full"))
    args = parser.parse_args()
    fractions = [float(f) for f in args.paced.split(",") if f]

    devices = _bench_devices(args.devices)
    port, http_port = free_port(), free_port()
    config = GATEWAY_CONFIG.format(
        durability=args.durability, repo=REPO, port=port, http_port=http_port, max_unacked=max(64, args.window),
        max_connections=args.devices + 100,
    )  # fmt: skip
    runs: list[dict[str, dict[str, Any]]] = []
    started = time.monotonic()
    null = NullGateway(args.devices)
    try:
        with GatewayDaemon(config, files={"devices.toml": secrets_toml(devices)}) as daemon:
            warm = _run(
                run_load("127.0.0.1", port, devices, frames_per_device=args.warmup_frames,
                         window=args.window, payload_bytes=args.payload_bytes)
            )  # fmt: skip
            if warm.errors:
                raise SystemExit(f"warm-up failed: {warm.errors[:3]}\n{daemon.log_tail()}")
            servers = {"null": (null.port, null.child.pid), "gateway": (port, daemon.pid)}
            next_seq = {kind: args.warmup_frames + 1 for kind in servers}  # contiguous per device
            for repeat in range(args.repeats):
                run: dict[str, dict[str, Any]] = {}
                for kind, (server_port, pid) in servers.items():
                    top = closed_loop(server_port, devices, args, next_seq[kind], pid)
                    next_seq[kind] += args.frames
                    run[kind] = {"max": top}
                    for fraction in fractions:
                        paced, next_seq[kind] = _run(
                            paced_load(
                                "127.0.0.1", server_port, devices,
                                rate_per_s=top["frames_per_s"] * fraction, duration_s=args.paced_s,
                                warmup_s=1.0, first_seq=next_seq[kind], window=args.window,
                                payload_bytes=args.payload_bytes,
                                cpu=lambda pid=pid: proc_cpu_s(pid),
                            )
                        )  # fmt: skip
                        run[kind][phase_name(fraction)] = paced
                    print(f"  repeat {repeat + 1} {kind}: " + "; ".join(
                        f"{phase} {r['frames_per_s']:.0f} frames/s p99 {r['ack_p99_ms']} ms"
                        f" errors {r['errors']}" for phase, r in run[kind].items()),
                        file=sys.stderr, flush=True)  # fmt: skip
                runs.append(run)
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise SystemExit(f"gatewayd died: {daemon.log_tail()}")
            counters = daemon_counters(http_port)
    finally:
        null.close()

    def median(kind: str, phase: str, key: str) -> float | None:
        values = [r[kind][phase][key] for r in runs if key in r[kind][phase]]
        return round(statistics.median(values), 3) if values else None

    phases = ["max"] + [phase_name(f) for f in fractions]
    medians = {
        kind: {
            phase: {
                key: median(kind, phase, key)
                for key in runs[0][kind][phase]
                if key != "error_samples"
            }
            for phase in phases
        }
        for kind in ("null", "gateway")
    }
    print(
        f"{'gateway side':<20}{'load':<14}{'frames/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'enc us/fr':>10}{'gw cpu us/fr':>13}{'errors':>8}"
    )
    labels = {"null": "null (baseline)", "gateway": f"gatewayd ({args.durability})"}
    for kind, m in medians.items():
        for phase, r in m.items():
            print(
                f"{labels[kind]:<20}{phase:<14}{r['frames_per_s']:>10.0f}{r['ack_p50_ms']:>9.2f}"
                f"{r['ack_p99_ms']:>9.2f}{r['client_encode_us_per_frame']:>10.2f}"
                f"{r['gateway_cpu_us_per_frame']:>13.1f}{r['errors']:>8.0f}"
            )
    gw, base = medians["gateway"]["max"], medians["null"]["max"]
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
            "ack_p99_met_at_max": gw["ack_p99_ms"] < TARGET_P99_MS,
            **{
                f"ack_p99_met_{phase}": medians["gateway"][phase]["ack_p99_ms"] < TARGET_P99_MS
                for phase in phases[1:]
            },
        },
        "gateway_counters": counters,
        "runs": runs,
    }
    print(json.dumps(output))


if __name__ == "__main__":
    main()
