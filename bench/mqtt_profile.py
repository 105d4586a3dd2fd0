"""Profile the real daemon's MQTT path under paced real-client load (issue 9).

Starts a private mosquitto, one `gatewayd run` (TelemetryEcho route, as bench/mqtt.py), the 20
`mosquitto_pub` publishers of bench/mqtt_real.py at `--rate` msg/s, and records the daemon with
`py-spy record --format raw` (collapsed stacks) for `--seconds`. Prints the top functions by
self time and by inclusive time, and the daemon's CPU per message over the recorded window.

    .venv/bin/python bench/mqtt_profile.py --rate 5000 --seconds 15 --out /tmp/mqtt.collapsed
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mqtt import BenchBroker, start_gateway_daemon
from bench.mqtt_real import Publishers, Watcher


def summarize(collapsed: Path, top: int) -> None:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"samples: {total}")
    for title, counter in (("self", self_time), ("inclusive", inclusive)):
        print(f"-- top {top} by {title} time")
        for frame, count in counter.most_common(top):
            print(f"{100 * count / total:6.1f}%  {frame}")


async def profile(args: argparse.Namespace) -> None:
    broker = BenchBroker(
        persistence=False, max_inflight_messages=1000, max_queued_messages=1_000_000
    )
    broker.start()
    ns = argparse.Namespace(gateway_inflight=args.inflight, gateway_pending=1000)
    repo = Path(args.repo).resolve()
    daemon = await start_gateway_daemon(ns, broker.url, args.durability, "native", repo)
    replies = Watcher(broker.port, "devices/+/cmd")
    await replies.start()
    publishers = Publishers(broker.port)
    await publishers.start()
    try:
        offering = asyncio.create_task(publishers.offer(args.rate, args.warmup_s + args.seconds))
        await asyncio.sleep(args.warmup_s)
        seen, cpu = len(replies.seen), daemon.cpu_s()
        began = time.monotonic()
        spy = await asyncio.create_subprocess_exec(
            args.py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "200",
            "--duration", str(int(args.seconds)), "--pid", str(daemon.pid),
            "--output", str(args.out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await spy.wait()
        served, used = len(replies.seen) - seen, daemon.cpu_s() - cpu
        window = time.monotonic() - began
        await offering
    finally:
        await publishers.stop()
        await replies.stop()
        await asyncio.to_thread(daemon.close)
        broker.stop()
    print(
        f"served {served / window:.0f} replies/s of {args.rate} offered; "
        f"daemon CPU {used * 1e6 / max(served, 1):.1f} us/msg (under py-spy)"
    )
    summarize(Path(args.out), args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup-s", type=float, default=5)
    parser.add_argument("--durability", default="normal")
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "gatewayd-mqtt-profile.collapsed"
    )
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or ".venv/bin/py-spy")
    args = parser.parse_args()
    asyncio.run(profile(args))


if __name__ == "__main__":
    main()
