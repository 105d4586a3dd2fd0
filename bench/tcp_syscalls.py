"""Syscalls and CPU per paced TCP frame of the `raw` / `null` baseline servers, trees interleaved.

For each tree in turn (base, branch, base, branch, ...) this starts `bench/tcp_load.py --serve
KIND` from that tree (its own code on PYTHONPATH), connects `--devices` paced devices
(bench/tcp_paced.py of THIS tree, 2 sender processes) at `--rate` frames/s in all, and over the
measured window counts the server's syscalls (`perf stat -e 'syscalls:sys_enter_*'`) and CPU.
Prints one JSON line per run and the medians per tree.

    python bench/tcp_syscalls.py --kind null --trees /work/main,. --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._gateway import GatewayDaemon  # noqa: E402
from bench.tcp import GATEWAY_CONFIG, _run, proc_user_sys_s, secrets_toml  # noqa: E402
from bench.tcp_load import _bench_devices, run_load  # noqa: E402
from bench.tcp_paced import start_senders  # noqa: E402
from tests.brokers import free_port  # noqa: E402


def _server(tree: Path, kind: str, devices: int, state_dir: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    child = subprocess.Popen(
        [sys.executable, str(tree / "bench" / "tcp_load.py"), "--serve", kind,
         "--devices", str(devices), "--state-dir", state_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree,
    )  # fmt: skip
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith("PORT "):
        raise SystemExit(f"server did not start: {line!r}")
    return child, int(line.split()[1])


class _Gateway:
    """The real daemon from `tree` (FrameCounter, durability normal), every agent woken."""

    def __init__(self, tree: Path, devices: int) -> None:
        port, http_port = free_port(), free_port()
        config = GATEWAY_CONFIG.format(
            durability="normal", agent_class="bench.gateway_agents:FrameCounter", repo=tree,
            port=port, http_port=http_port, max_unacked=64, max_connections=devices + 100,
        )  # fmt: skip
        fleet = _bench_devices(devices)
        self.daemon = GatewayDaemon(config, files={"devices.toml": secrets_toml(fleet)}, repo=tree)
        self.daemon.__enter__()
        self.pid, self.port = self.daemon.pid, port
        for first in range(0, devices, 200):
            warm = _run(
                run_load("127.0.0.1", port, fleet[first : first + 200], frames_per_device=5,
                         window=8, payload_bytes=64)
            )  # fmt: skip
            if warm.errors:
                raise SystemExit(f"warm-up failed: {warm.errors[:3]}")

    def close(self) -> None:
        self.daemon.__exit__(None, None, None)


def one_run(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tcp-sys-") as tmp:
        gateway: _Gateway | None = None
        if args.kind == "gateway":
            gateway = _Gateway(tree, args.devices)
            pid, port, first_seq = gateway.pid, gateway.port, 6
        else:
            server, port = _server(tree, args.kind, args.devices, tmp)
            pid, first_seq = server.pid, 1
        try:
            senders = start_senders(
                port, 2, args.devices, rate=args.rate, first_seq=first_seq, window=8,
                payload_bytes=64, result_dir=tmp, env=dict(os.environ, PYTHONPATH=str(REPO)),
            )  # fmt: skip
            for sender in senders:
                assert sender.stdout is not None
                if sender.stdout.readline().strip() != "READY":
                    raise SystemExit("sender did not connect")
            t0 = time.monotonic() + 0.05
            for sender in senders:
                assert sender.stdin is not None
                sender.stdin.write(f"GO {t0} 1.0 {args.seconds}\n")
                sender.stdin.flush()
            time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
            perf = subprocess.Popen(
                ["perf", "stat", "-x", ",", "-e",
                 "syscalls:sys_enter_*", "-p", str(pid),
                 "--", "sleep", str(args.seconds)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            spy = None
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                out = Path(args.profile) / f"{args.kind}-{tree.name}-{time.time_ns()}.txt"
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-f",
                     "raw", "-r", "500", "--gil", "--nonblocking", "-d", str(int(args.seconds)),
                     "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            record = None
            if args.perf_record:
                record = subprocess.Popen(
                    ["perf", "record", "-g", "-p", str(pid), "-o", args.perf_record, "--",
                     "sleep", str(args.seconds)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            user0, sys0 = proc_user_sys_s(pid)
            load = os.getloadavg()[0]
            _, perf_err = perf.communicate()
            user1, sys1 = proc_user_sys_s(pid)
            if spy is not None:
                spy.wait()
            if record is not None:
                record.wait()
            results = []
            for p, sender in enumerate(senders):
                assert sender.stdout is not None
                if sender.stdout.readline().strip() != "DONE":
                    raise SystemExit("sender failed")
                sender.wait()
                results.append(json.loads(Path(f"{tmp}/sender-{p}.json").read_text()))
        finally:
            if gateway is not None:
                gateway.close()
            else:
                assert server.stdin is not None
                server.stdin.close()
                server.wait(timeout=30)
    frames = sum(len(r["latencies_us"]) for r in results)
    lat = sorted(x for r in results for x in r["latencies_us"])
    counts: dict[str, float] = {}
    for line in perf_err.splitlines():
        m = re.match(r"^([\d.]+),,syscalls:sys_enter_(\w+)", line)
        if m:
            counts[m.group(2)] = round(float(m.group(1)) / max(1, frames), 3)
    return {
        "tree": str(tree),
        "kind": args.kind,
        "rate": args.rate,
        "frames": frames,
        "cpu_us_per_frame": round((user1 - user0 + sys1 - sys0) * 1e6 / max(1, frames), 1),
        "sys_us_per_frame": round((sys1 - sys0) * 1e6 / max(1, frames), 1),
        "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] / 1000, 3) if lat else None,
        "syscalls_per_frame": {k: v for k, v in counts.items() if v},
        "load": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="null", choices=["raw", "null", "gateway"])
    parser.add_argument("--trees", default=f"/work/main,{REPO}")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=4000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--perf-record", metavar="FILE", help="perf record -g meanwhile")
    parser.add_argument("--profile", metavar="DIR", help="py-spy (on-CPU) the server meanwhile")
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    by_tree: dict[str, list[dict[str, Any]]] = {str(t): [] for t in trees}
    for _ in range(args.pairs):
        for tree in trees:
            run = one_run(tree, args)
            by_tree[str(tree)].append(run)
            print(json.dumps(run), flush=True)
    for tree, runs in by_tree.items():
        print(
            f"{tree}: cpu us/frame median {statistics.median(r['cpu_us_per_frame'] for r in runs)}"
            f" sys {statistics.median(r['sys_us_per_frame'] for r in runs)}"
            f" p99 ms {statistics.median(r['p99_ms'] for r in runs)}"
            f" loads {[r['load'] for r in runs]}"
        )


if __name__ == "__main__":
    main()
