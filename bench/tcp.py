"""TCP binary frames through the REAL daemon: many connected devices, a state write per frame.

A `gatewayd run` child process serves `[listeners.binary]` with the `--agent` class
(bench/gateway_agents.py; `FrameCounter`: one small SQL insert + one `set_state` per DATA
frame; `TelemetryEcho`: the same plus a reply, a PUSH, per frame), durability `normal` by
default; every device is its own agent with its own SQLite file. A warm-up wakes every agent
first, so the measured passes are the steady state.

Baselines in the same run, each its own child process, measured in every repeat right before
the daemon: `raw` (a bare asyncio.Protocol with the frame codec that ACKs every DATA at once:
no session rules, no auth, no state) and `null` (TcpListener + a handler that resolves every
frame at once: the transport's own cost), and with `--baselines raw,null,sqlite` also
`sqlite` (TcpListener + a bare sqlite3 file per device, row + last seq in one transaction
per frame: the durable floor with per-device files, without the agent runtime) and
`sqlite-group` (the same with one transaction per file per loop iteration).

Passes per server and repeat:
- `max`: closed loop (bench/tcp_load.py `run_load`, in this process): every device streams
  `--frames` DATA frames with `--window` unACKed;
- `paced_<N>pct`: open loop at N% of that server's own max rate, from `--senders` processes
  (`--sender c`: bench/tcp_paced_sender.c, compiled on first use, the default where gcc is
  installed; `--sender python`: bench/tcp_paced.py, 2-3x the CPU per frame): every connection
  sends one frame per fixed interval, phases spread evenly, whatever the ACKs do; the latency
  of every frame sent in the `--paced-s` window, and the senders' CPU per frame.
The server's CPU (utime+stime, all threads) and its threads' run-queue wait (runnable
without a core: the box's other load) are read around each pass, and the box's speed for
pure Python (`box_encode_us_per_frame`, before and after) goes into the JSON line, so runs
of different days compare; `--profile DIR` runs
py-spy on the daemon in the first repeat (summarise with bench/tcp_profile.py); `--probe FILE`
instruments the daemon (bench/tcp_probe.py: per-frame read/submit/settled/ACK-written times,
loop stalls with the loop thread's CPU and stack, GC pauses) and adds a summary per gateway
pass to the JSON line.

    python bench/tcp.py                          # 1,000 devices
    python bench/tcp.py --devices 500 --frames 40 --repeats 2 --profile /tmp/tcp-prof
    python bench/tcp.py --devices 500 --frames 40 --repeats 1 --probe /tmp/tcp-probe.json

Targets (issue 9): >= 30,000 acknowledged frames/s with a state write per frame; ack p99
< 10 ms at 50% of the max rate with paced senders. Prints a table, then one JSON line
(medians over --repeats; ratios to the raw echo per repeat, then their median).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
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
from bench.tcp_paced import SENDERS, default_sender, start_senders  # noqa: E402
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
class = "{agent_class}"
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
    return sum(proc_user_sys_s(pid))


def proc_runqueue_wait_s(pid: int) -> float:
    """Time the process's threads sat runnable without a CPU (other processes had it),
    summed over its threads now alive (/proc/PID/task/*/schedstat, second field), seconds."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # a thread that ended meanwhile, or a kernel without schedstat
    return total_ns / 1e9


def box_encode_us_per_frame(frames: int = 20_000, rounds: int = 5) -> float:
    """The box's speed for pure Python: CPU µs to build and encode one DATA frame (the load
    generator's own codec), best of `rounds`. The same code measured ~1.1 µs on 2026-11-26's
    box; compare runs from different days by this figure before blaming the code."""
    from protocols.frames import Data, encode

    payload = b"x" * 64
    best_ns = float("inf")
    for _ in range(rounds):
        began = time.process_time_ns()
        for seq in range(1, frames + 1):
            encode(Data(seq, payload))
        best_ns = min(best_ns, time.process_time_ns() - began)
    return round(best_ns / frames / 1000, 3)


def proc_user_sys_s(pid: int) -> tuple[float, float]:
    """utime and stime (the kernel's share: syscalls, page faults) of a process, seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS_PER_S, int(fields[12]) / CLOCK_TICKS_PER_S


class BaselineServer:
    """A tcp_load baseline server as a child process: `raw` (bare asyncio.Protocol + codec,
    ACKs at once) or `null` (TcpListener + a resolve-at-once handler)."""

    def __init__(self, kind: str, device_count: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"tcp-{kind}-")
        self.child = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "tcp_load.py"), "--serve", kind,
             "--devices", str(device_count), "--state-dir", self._tmp.name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line.startswith("PORT "):
            self.close()
            raise SystemExit(f"{kind} baseline child did not start: {line!r}")
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


def _quantile_ms(ordered_us: list[int], q: float) -> float:
    if not ordered_us:
        return float("nan")
    return round(ordered_us[min(len(ordered_us) - 1, int(q * len(ordered_us)))] / 1000, 3)


def paced_pass(
    port: int, device_count: int, *, rate_per_s: float, first_seq: int, args: argparse.Namespace,
    pid: int,
) -> tuple[dict[str, Any], int]:  # fmt: skip
    """Open loop at `rate_per_s` in total: `--senders` processes (bench/tcp_paced.py), each
    device at a fixed interval. Returns the summary and the next free seq of every device."""
    results_dir = tempfile.TemporaryDirectory(prefix="tcp-paced-")
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result_files = [Path(results_dir.name) / f"sender-{p}.json" for p in range(args.senders)]
    senders = start_senders(
        port, args.senders, device_count, rate=rate_per_s, first_seq=first_seq,
        window=args.window, payload_bytes=args.payload_bytes, result_dir=results_dir.name,
        sender=args.sender,
    )  # fmt: skip
    try:
        for sender in senders:
            assert sender.stdout is not None
            line = sender.stdout.readline()
            if line.strip() != "READY":
                raise SystemExit(f"paced sender did not connect: {line!r}")
        warmup_s, duration_s = 1.0, args.paced_s
        t0 = time.monotonic() + 0.05
        for sender in senders:
            assert sender.stdin is not None
            sender.stdin.write(f"GO {t0} {warmup_s} {duration_s}\n")
            sender.stdin.flush()
        time.sleep(max(0.0, t0 + warmup_s - time.monotonic()))
        window = (t0 + warmup_s, t0 + warmup_s + duration_s)
        user_before, sys_before = proc_user_sys_s(pid)
        wait_before = proc_runqueue_wait_s(pid)
        time.sleep(max(0.0, t0 + warmup_s + duration_s - time.monotonic()))
        user_after, sys_after = proc_user_sys_s(pid)
        wait_s = proc_runqueue_wait_s(pid) - wait_before
        sys_s = sys_after - sys_before
        cpu_s = user_after - user_before + sys_s
        results = []
        for sender, result_file in zip(senders, result_files, strict=True):
            assert sender.stdout is not None
            line = sender.stdout.readline()
            if line.strip() != "DONE":
                raise SystemExit(f"paced sender failed: {line!r}")
            results.append(json.loads(result_file.read_text()))
    finally:
        for sender in senders:
            try:
                sender.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sender.kill()
                sender.wait()
        results_dir.cleanup()
    # The senders are the only children reaped during the pass: their whole CPU (connect,
    # warm-up and drain included, so an upper bound per frame).
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    senders_cpu_s = sum(
        getattr(children, f) - getattr(children_before, f) for f in ("ru_utime", "ru_stime")
    )
    latencies = sorted(x for r in results for x in r["latencies_us"])
    acked = len(latencies)
    errors = [e for r in results for e in r["errors"]]
    summary: dict[str, Any] = {
        "offered_frames_per_s": round(rate_per_s, 1),
        "frames_per_s": round(acked / duration_s, 1),
        "ack_p50_ms": _quantile_ms(latencies, 0.50),
        "ack_p99_ms": _quantile_ms(latencies, 0.99),
        "ack_max_ms": _quantile_ms(latencies, 1.0),
        "skipped_window_full": sum(r["skipped_window_full"] for r in results),
        "sent_late_pct": round(
            100 * sum(r["sent_late"] for r in results) / max(1, sum(r["sent"] for r in results)), 2
        ),
        "errors": sum(r["error_count"] for r in results),
        "gateway_cpu_us_per_frame": round(cpu_s * 1e6 / max(1, acked), 1),
        "gateway_sys_cpu_us_per_frame": round(sys_s * 1e6 / max(1, acked), 1),
        # Of one core: the event loop is one thread, so near 100 the server is saturated.
        "gateway_cpu_pct": round(100 * cpu_s / duration_s, 1),
        # Runnable but not running (the box's other load had the CPUs), % of the window.
        "gateway_runqueue_wait_pct": round(100 * wait_s / duration_s, 1),
        "senders_cpu_us_per_frame": round(
            senders_cpu_s * 1e6 / max(1, sum(r["sent"] for r in results)), 1
        ),
        "window_monotonic": window,
    }
    if errors:
        summary["error_samples"] = sorted(set(errors))[:3]
    return summary, max(r["next_seq"] for r in results)


def daemon_counters(http_port: int) -> dict[str, float]:
    """A few of the daemon's own counters (from /metrics) that explain a slow run."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = (
        "gatewayd_agent_wakes_total", "gatewayd_agent_hibernations_total",
        "gatewayd_agent_commits_total", "gatewayd_agent_commit_errors_total",
        "gatewayd_agent_turns_total", "process_resident_memory_bytes",
        "gatewayd_tcp_backpressure_pauses_total", "gatewayd_agent_mailbox_full_total",
    )  # fmt: skip
    counters: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split(" ", 1)[0]
        if name.split("{", 1)[0] in wanted:
            counters[name] = float(line.rsplit(" ", 1)[1])
    return counters


def request_probe_dump(path: Path, timeout_s: float = 60) -> None:
    """Ask the daemon's probe (bench/tcp_probe.py) for its data and wait until it is written."""
    path.unlink(missing_ok=True)
    Path(f"{path}.request").touch()
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"the daemon's probe wrote no {path} within {timeout_s} s")
        time.sleep(0.1)


def phase_name(fraction: float, args: argparse.Namespace) -> str:
    if args.paced_rate:
        return f"paced_{round(args.paced_rate)}per_s"
    return f"paced_{round(fraction * 100)}pct"


def summary(result: LoadResult, cpu_s: float) -> dict[str, Any]:
    s = result.summary()
    s["gateway_cpu_us_per_frame"] = round(cpu_s * 1e6 / max(1, result.frames_acked), 1)
    if result.errors:
        s["error_samples"] = sorted(set(result.errors))[:3]
    return s


class Profiler:
    """py-spy on a server process for one phase (`--profile DIR`): raw collapsed stacks of
    the threads holding the GIL, written to DIR/<kind>-<phase>.txt when the phase ends."""

    def __init__(self, directory: str | None) -> None:
        self.directory = Path(directory) if directory else None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int, name: str) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        py_spy = Path(os.environ.get("PY_SPY") or Path(sys.executable).with_name("py-spy"))
        if not py_spy.exists():
            raise SystemExit(
                f"--profile needs py-spy next to {sys.executable} (pip install py-spy) or $PY_SPY"
            )
        self._proc = subprocess.Popen(
            [str(py_spy), "record", "-p", str(pid), "-f", "raw", "-r", "250", "--gil",
             "--nonblocking", "-F", "-o", str(self.directory / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)
            self._proc.wait(timeout=60)
            self._proc = None


def closed_loop(
    port: int, devices: list[tuple[str, str]], args: argparse.Namespace, first_seq: int, pid: int
) -> dict[str, Any]:
    """tcp_load.run_load (all devices, `--window` pipelined each) with the server's CPU."""
    cpu_before = proc_cpu_s(pid)
    wait_before = proc_runqueue_wait_s(pid)
    started = time.monotonic()
    result = _run(
        run_load(
            "127.0.0.1", port, devices, frames_per_device=args.frames, window=args.window,
            payload_bytes=args.payload_bytes, first_seq=first_seq,
        )
    )  # fmt: skip
    # Includes the pass's HELLOs (connects): an upper bound of the per-frame cost.
    cpu_s = proc_cpu_s(pid) - cpu_before
    wait_s = proc_runqueue_wait_s(pid) - wait_before
    elapsed_s = time.monotonic() - started
    top = summary(result, cpu_s)
    top["gateway_cpu_pct"] = round(100 * cpu_s / elapsed_s, 1)
    top["gateway_runqueue_wait_pct"] = round(100 * wait_s / elapsed_s, 1)
    top["window_monotonic"] = (started, started + elapsed_s)
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=60, help="DATA frames per device (max pass)")
    parser.add_argument("--window", type=int, default=8, help="unacked frames per device")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--warmup-frames", type=int, default=5, help="per device, before measuring")
    parser.add_argument("--paced-s", type=float, default=4.0, help="measured window per paced pass")
    parser.add_argument(
        "--paced", default="0.5", help="open-loop passes at these fractions of the max rate"
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        help="one open-loop pass at this many frames/s for every server instead of --paced "
        "(the same load for builds whose max rates differ)",
    )
    parser.add_argument("--senders", type=int, default=2, help="paced sender processes")
    parser.add_argument(
        "--sender",
        choices=SENDERS,
        default=default_sender(),
        help="paced senders: c (bench/tcp_paced_sender.c, default where gcc is installed) or "
        "python (bench/tcp_paced.py, ~10x the CPU per frame)",
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the gateway's phases into DIR")
    parser.add_argument(
        "--probe",
        metavar="FILE",
        help="instrument the daemon (bench/tcp_probe.py: loop stalls, GC, per-frame latency "
        "split) and add its summary per gateway pass to the JSON line",
    )
    parser.add_argument(
        "--baselines",
        default="raw,null",
        help="baseline servers run beside the daemon: raw (required), null, sqlite (TcpListener "
        "+ a bare sqlite3 file per device, one transaction per frame: the durable floor "
        "without the agent runtime), sqlite-group (the same, one transaction per file per loop "
        "iteration)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--durability", default="normal", choices=("normal", "full"))
    parser.add_argument(
        "--agent",
        default="FrameCounter",
        choices=("FrameCounter", "TelemetryEcho"),
        help="bench/gateway_agents.py class; TelemetryEcho also replies (a PUSH) per frame",
    )
    args = parser.parse_args()
    fractions = [float(f) for f in args.paced.split(",") if f] if not args.paced_rate else [0.0]
    agent_class = f"bench.gateway_agents:{args.agent}"
    if args.probe:
        if args.agent != "FrameCounter":
            raise SystemExit("--probe instruments the FrameCounter agent only")
        os.environ["TCP_PROBE_OUT"] = str(Path(args.probe).resolve())
        agent_class = "bench.tcp_probe:FrameCounter"

    devices = _bench_devices(args.devices)
    port, http_port = free_port(), free_port()
    config = GATEWAY_CONFIG.format(
        durability=args.durability, agent_class=agent_class, repo=REPO, port=port, http_port=http_port, max_unacked=max(64, args.window),
        max_connections=args.devices + 100,
    )  # fmt: skip
    runs: list[dict[str, dict[str, Any]]] = []
    profiler = Profiler(args.profile)
    started = time.monotonic()
    box_speed = [box_encode_us_per_frame()]
    kinds = [k for k in args.baselines.split(",") if k]
    unknown = set(kinds) - {"raw", "null", "sqlite", "sqlite-group"}
    if unknown or "raw" not in kinds:
        raise SystemExit(
            f"--baselines: raw plus any of null, sqlite, sqlite-group (got {args.baselines!r})"
        )
    baselines = {kind: BaselineServer(kind, args.devices) for kind in kinds}
    try:
        with GatewayDaemon(config, files={"devices.toml": secrets_toml(devices)}) as daemon:
            # Wake (create) every agent (and the sqlite baseline's files), a few hundred at a
            # time: a thousand first opens at once can outlast the hello timeout on a busy disk.
            warm_ports = [port] + [
                baselines[kind].port for kind in ("sqlite", "sqlite-group") if kind in baselines
            ]
            for warm_port in warm_ports:
                for first in range(0, len(devices), 200):
                    warm = _run(
                        run_load("127.0.0.1", warm_port, devices[first : first + 200],
                                 frames_per_device=args.warmup_frames, window=args.window,
                                 payload_bytes=args.payload_bytes)
                    )  # fmt: skip
                    if warm.errors:
                        raise SystemExit(f"warm-up failed: {warm.errors[:3]}\n{daemon.log_tail()}")
            servers = {kind: (b.port, b.child.pid) for kind, b in baselines.items()}
            servers["gateway"] = (port, daemon.pid)
            next_seq = {kind: args.warmup_frames + 1 for kind in servers}  # contiguous per device
            for repeat in range(args.repeats):
                run: dict[str, dict[str, Any]] = {}
                for kind, (server_port, pid) in servers.items():
                    profiling = kind == "gateway" and repeat == 0
                    if profiling:
                        profiler.start(pid, "gateway-max")
                    top = closed_loop(server_port, devices, args, next_seq[kind], pid)
                    profiler.stop()
                    next_seq[kind] += args.frames
                    run[kind] = {"max": top}
                    for fraction in fractions:
                        if profiling:
                            profiler.start(pid, f"gateway-{phase_name(fraction, args)}")
                        paced, next_seq[kind] = paced_pass(
                            server_port, len(devices), rate_per_s=args.paced_rate or top["frames_per_s"] * fraction,
                            first_seq=next_seq[kind], args=args, pid=pid,
                        )  # fmt: skip
                        profiler.stop()
                        run[kind][phase_name(fraction, args)] = paced
                    print(f"  repeat {repeat + 1} {kind}: " + "; ".join(
                        f"{phase} {r['frames_per_s']:.0f} frames/s p99 {r['ack_p99_ms']} ms"
                        f" cpu {r['gateway_cpu_pct']}% runqueue wait {r['gateway_runqueue_wait_pct']}%"
                        f" errors {r['errors']}" for phase, r in run[kind].items()),
                        file=sys.stderr, flush=True)  # fmt: skip
                runs.append(run)
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise SystemExit(f"gatewayd died: {daemon.log_tail()}")
            if args.probe:
                request_probe_dump(Path(args.probe))
            counters = daemon_counters(http_port)
        box_speed.append(box_encode_us_per_frame())
    finally:
        for baseline in baselines.values():
            baseline.close()

    def median(kind: str, phase: str, key: str) -> float | None:
        values = [r[kind][phase][key] for r in runs if key in r[kind][phase]]
        return round(statistics.median(values), 3) if values else None

    phases = ["max"] + [phase_name(f, args) for f in fractions]
    medians = {
        kind: {
            phase: {
                key: median(kind, phase, key)
                for key in runs[0][kind][phase]
                if key not in ("error_samples", "window_monotonic")
            }
            for phase in phases
        }
        for kind in servers
    }
    print(
        f"{'server':<20}{'load':<14}{'offered/s':>10}{'frames/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'cpu us/fr':>10}{'errors':>8}"
    )
    labels = {
        "raw": "raw echo (baseline)",
        "null": "TcpListener, no agent",
        "sqlite": "listener+file/frame",
        "sqlite-group": "listener+file/iter",
        "gateway": f"gatewayd ({args.durability})",
    }
    for kind, m in medians.items():
        for phase, r in m.items():
            offered = r.get("offered_frames_per_s")
            print(
                f"{labels[kind]:<20}{phase:<14}{offered or 0:>10.0f}{r['frames_per_s']:>10.0f}"
                f"{r['ack_p50_ms']:>9.2f}{r['ack_p99_ms']:>9.2f}{r.get('ack_max_ms') or 0:>9.1f}"
                f"{r['gateway_cpu_us_per_frame']:>10.1f}{r['errors']:>8.0f}"
            )
    gw = medians["gateway"]["max"]

    def ratio(kind: str, phase: str, key: str) -> float | None:
        """Median over the repeats of gateway / `kind` (each repeat's own pair)."""
        values = [
            r["gateway"][phase][key] / r[kind][phase][key] for r in runs if r[kind][phase][key]
        ]
        return round(statistics.median(values), 3) if values else None

    output = {
        "bench": "tcp",
        "devices": args.devices,
        "frames_per_device": args.frames,
        "window": args.window,
        "paced_senders": f"{args.senders} x {args.sender}",
        "payload_bytes": args.payload_bytes,
        "durability": args.durability,
        "agent": args.agent,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - started, 1),
        "median": medians,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "box_encode_us_per_frame": box_speed,
        "gateway_vs_raw_frames_per_s": ratio("raw", "max", "frames_per_s"),
        **{
            f"gateway_vs_{kind}_frames_per_s": ratio(kind, "max", "frames_per_s")
            for kind in baselines
            if kind != "raw"
        },
        "gateway_vs_raw_cpu_per_frame": {
            phase: ratio("raw", phase, "gateway_cpu_us_per_frame") for phase in phases
        },
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
    if args.probe:
        from bench.tcp_probe import report

        windows = [
            (f"repeat{i + 1}-{phase}", *r["gateway"][phase]["window_monotonic"])
            for i, r in enumerate(runs)
            for phase in phases
        ]
        output["probe"] = report(args.probe, windows)
        print(json.dumps(output["probe"], indent=1), file=sys.stderr)
    print(json.dumps(output))


if __name__ == "__main__":
    main()
