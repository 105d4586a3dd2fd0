"""Instruments the daemon under bench/tcp.py `--probe FILE`: where a frame's latency goes.

bench/tcp.py then configures the agent class `bench.tcp_probe:FrameCounter` (bench's
FrameCounter, unchanged); importing this module inside the daemon (when it loads its agent
classes) installs, once:
- a loop-lag monitor: a task that sleeps 1 ms and records how late it wakes (a stall of the
  event loop: a long callback, a blocking call, a GC pause, or no CPU for the process);
- `gc.callbacks` timing every collection (generation, ms);
- per DATA frame, on `protocols.tcp._DeviceConnection`: the time it was read, submitted to
  the agent runtime, its future settled (the commit), and its ACK written;
and dumps them as JSON to $TCP_PROBE_OUT when $TCP_PROBE_OUT.request appears (monotonic timestamps: the bench's
clock, so the paced window can be cut out; `bench/tcp_probe.py --report FILE` summarises).
Bench-only: nothing here is imported by gatewayd itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gateway_agents import FrameCounter  # noqa: E402

__all__ = ["FrameCounter"]

_MAX_FRAMES = 400_000


class _Probe:
    def __init__(self, out: str) -> None:
        self.out = out
        # (at, late by s, the loop thread's CPU s meanwhile), only > 1 ms late: CPU ~ wall
        # is work on the loop; CPU << wall is a process without a core (or a GIL elsewhere)
        self.lags: list[tuple[float, float, float]] = []
        # (at, generation, s, CPU s, unreachable objects it freed)
        self.gcs: list[tuple[float, int, float, float, int]] = []
        # (read, submitted, settled, written) per frame, monotonic s
        self.frames: list[tuple[float, float, float, float]] = []
        self.ack_writes: list[tuple[float, int]] = []  # (at, ACKs in that write)
        self._gc_start = self._gc_cpu = 0.0
        self.tick = 0.0  # the lag monitor's last wake-up
        self.loop_thread = 0
        # (at, stalled for s, the loop thread's stack) when the loop has not ticked for 50 ms
        self.stalls: list[tuple[float, float, list[str]]] = []

    def watchdog(self) -> None:
        """A thread: the loop thread's stack while the loop is stalled (once per 50 ms)."""
        last_captured = 0.0
        while True:
            time.sleep(0.01)
            now = time.monotonic()
            if self.tick and now - self.tick > 0.05 and now - last_captured > 0.05:
                last_captured = now
                frame = sys._current_frames().get(self.loop_thread)
                stack = (
                    [
                        f"{Path(f.filename).name}:{f.lineno} {f.name}"
                        for f in traceback.extract_stack(frame)[-14:]
                    ]
                    if frame is not None
                    else []
                )
                self.stalls.append((now, now - self.tick, stack))

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now, cpu = time.monotonic(), time.thread_time()
        if phase == "start":
            self._gc_start, self._gc_cpu = now, cpu
        else:
            self.gcs.append(
                (
                    self._gc_start,
                    info["generation"],
                    now - self._gc_start,
                    cpu - self._gc_cpu,
                    info["collected"],
                )
            )

    async def lag_monitor(self) -> None:
        last_dump = time.monotonic()
        while True:
            before, cpu_before = time.monotonic(), time.thread_time()
            await asyncio.sleep(0.001)
            now = self.tick = time.monotonic()
            late = now - before - 0.001
            if late > 0.001:
                self.lags.append((before, late, time.thread_time() - cpu_before))
            if now - last_dump > 0.2:
                last_dump = now
                if os.path.exists(self.out + ".request"):  # bench/tcp.py asks for the data
                    os.unlink(self.out + ".request")
                    self.dump()

    def dump(self) -> None:
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "lags": self.lags,
                    "gcs": self.gcs,
                    "frames": self.frames,
                    "stalls": self.stalls,
                    "ack_writes": self.ack_writes,
                },
                f,
            )
        os.replace(tmp, self.out)


def _install(out: str) -> None:
    from protocols import tcp

    probe = _Probe(out)
    gc.callbacks.append(probe.on_gc)
    monitor: list[asyncio.Task[None]] = []  # started on the loop by the first read
    conn_cls = tcp._DeviceConnection
    orig_data_received = conn_cls.data_received
    orig_submit = conn_cls._submit
    orig_settled = conn_cls._settled
    orig_flush = conn_cls._flush
    mono = time.monotonic

    def data_received(self: Any, data: bytes) -> None:
        self._probe_read = mono()
        if not monitor:
            monitor.append(asyncio.get_running_loop().create_task(probe.lag_monitor()))
            probe.loop_thread = threading.get_ident()
            threading.Thread(target=probe.watchdog, daemon=True, name="tcp-probe").start()
        orig_data_received(self, data)

    def submit(self: Any, frame: Any) -> None:
        times = self.__dict__.setdefault("_probe_times", {})
        times[frame.seq] = [getattr(self, "_probe_read", 0.0), mono(), 0.0]
        orig_submit(self, frame)

    def settled(self: Any, seq: int, future: Any) -> None:
        entry = self.__dict__.get("_probe_times", {}).get(seq)
        if entry is not None and not entry[2]:
            entry[2] = mono()
            self.__dict__.setdefault("_probe_acks", []).append(seq)
        orig_settled(self, seq, future)

    def flush(self: Any) -> None:
        orig_flush(self)
        acks = self.__dict__.get("_probe_acks")
        if acks:
            now = mono()
            times = self._probe_times
            for seq in acks:
                read, submitted, done = times.pop(seq)
                if len(probe.frames) < _MAX_FRAMES:
                    probe.frames.append((read, submitted, done, now))
            probe.ack_writes.append((now, len(acks)))
            acks.clear()

    conn_cls.data_received = data_received  # type: ignore[method-assign]
    conn_cls._submit = submit  # type: ignore[method-assign]
    conn_cls._settled = settled  # type: ignore[method-assign]
    conn_cls._flush = flush  # type: ignore[method-assign]


_out = os.environ.get("TCP_PROBE_OUT")
if _out and not getattr(sys, "_tcp_probe_installed", False):
    sys._tcp_probe_installed = True  # type: ignore[attr-defined]
    _install(_out)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def report(path: str, windows: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Per window (name, from, to): the frame latency split, the loop's stalls, the GCs."""
    data = json.loads(Path(path).read_text())
    result: dict[str, Any] = {}
    for name, start, end in windows:
        frames = [f for f in data["frames"] if start <= f[1] < end]
        lags = [lag for at, lag, _ in data["lags"] if start <= at < end]
        stall_cpu = [cpu for at, lag, cpu in data["lags"] if start <= at < end and lag > 0.005]
        gcs = [g for g in data["gcs"] if start <= g[0] < end]
        parts = {
            "read_to_submit": [f[1] - f[0] for f in frames if f[0]],
            "submit_to_settled": [f[2] - f[1] for f in frames],
            "settled_to_written": [f[3] - f[2] for f in frames],
            "read_to_written": [f[3] - f[0] for f in frames if f[0]],
        }
        writes = [n for at, n in data.get("ack_writes", []) if start <= at < end]
        stacks = collections.Counter(
            " < ".join(reversed(stack[-3:]))
            for at, _, stack in data.get("stalls", [])
            if start <= at < end
        )
        result[name] = {
            "frames": len(frames),
            "acks_per_write": round(sum(writes) / len(writes), 2) if writes else None,
            **{
                key: {"p50_ms": _pct(v, 0.5), "p99_ms": _pct(v, 0.99), "max_ms": _pct(v, 1.0)}
                for key, v in parts.items()
            },
            "loop_stalls_over_5ms": sum(1 for lag in lags if lag > 0.005),
            "loop_stall_ms_total_over_5ms": round(sum(lag for lag in lags if lag > 0.005) * 1e3),
            "loop_stall_cpu_ms_total_over_5ms": round(sum(stall_cpu) * 1e3),
            "loop_stall_max_ms": round(max(lags, default=0.0) * 1e3, 1),
            "loop_stall_p50_ms": round(statistics.median(lags) * 1e3, 2) if lags else 0.0,
            # Where the loop thread was, sampled every 50 ms of a stall (innermost first).
            "stalled_in": dict(stacks.most_common(5)),
            "gc": {
                str(gen): {
                    "count": sum(1 for g in gcs if g[1] == gen),
                    "max_ms": round(max((g[2] for g in gcs if g[1] == gen), default=0) * 1e3, 1),
                    "total_ms": round(sum(g[2] for g in gcs if g[1] == gen) * 1e3, 1),
                    "max_cpu_ms": round(
                        max((g[3] for g in gcs if g[1] == gen), default=0) * 1e3, 1
                    ),
                    "total_cpu_ms": round(sum(g[3] for g in gcs if g[1] == gen) * 1e3, 1),
                    "collected": sum(g[4] for g in gcs if g[1] == gen and len(g) > 4),
                }
                for gen in (0, 1, 2)
            },
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--window", nargs=3, action="append", metavar=("NAME", "FROM", "TO"))
    args = parser.parse_args()
    windows = [(n, float(a), float(b)) for n, a, b in args.window or [("all", 0, 1e18)]]
    print(json.dumps(report(args.file, windows), indent=1))


if __name__ == "__main__":
    main()
