"""An MQTT backlog and a TCP device on one agent: TCP ACK latency and the backlog's drain rate
for several `[mqtt] max_inflight_per_device` windows, against the unbounded baseline.

Each run is a fresh private Mosquitto and a real `gatewayd run` process
(tests/gatewayd/fairness_site.py): the broker holds a backlog of QoS 1 messages for agent
recorder/dev-1 (the gateway's persistent session); the gateway starts and drains them while a
TCP device sends frames to the same agent one at a time and records each ACK's latency; a
listener counts the agent's replies on devices/dev-1/cmd. Rates: backlog / time until every
message was applied ("mqtt msg/s"), and until every reply had arrived too ("replied/s": the
whole job; an agent that runs 1,000 turns back to back applies faster but replies later).
Loads: "slow" (1,500 messages, each turn sleeps 2 ms: an agent with real work), "fast"
(4,000, an INSERT and a reply only), "fast-noprobe" (no TCP device: the window's cost
alone). The baseline is a window of 1,000,000 (the bridge before the window: up to
`max_pending_messages` of one device in the mailbox). Repeats are interleaved (every window,
then again); medians; ratios to the baseline; then ONE JSON line.

    python bench/mqtt_fairness.py                       # 3 repeats, windows 32 and 128
    python bench/mqtt_fairness.py --repeats 5 --windows 16,32,64 --loads slow,fast
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.brokers import MosquittoBroker  # noqa: E402
from tests.gatewayd.fairness_site import Drain, FairnessSite  # noqa: E402
from tests.gatewayd.notify import NotifySocket  # noqa: E402

BASELINE = 1_000_000
# name: (payload prefix, backlog, TCP probe on)
LOADS = {
    "slow": ("slow:", 1500, True),
    "fast": ("fast:", 4000, True),
    "fast-noprobe": ("fast:", 4000, False),
}


async def one_run(window: int, prefix: str, backlog: int, probe: bool) -> Drain:
    with tempfile.TemporaryDirectory(prefix="gatewayd-fairness-") as tmp:
        directory = Path(tmp)
        broker = MosquittoBroker(directory / "mosquitto")
        broker.start()
        notify = NotifySocket(directory)
        site = FairnessSite(
            directory, broker, notify, mqtt_extra=f"max_inflight_per_device = {window}"
        )
        try:
            payloads = [f"{prefix}{i}".encode() for i in range(backlog)]
            await site.queue_backlog(payloads)
            drain = await site.drain_with_tcp_probe(backlog, timeout_s=120, probe=probe)
            if site.process.stop() != 0:
                raise RuntimeError("gatewayd did not stop cleanly")
            applied = [b for t, b in site.rows() if t == "mqtt"]
            if applied != payloads:
                raise RuntimeError(f"window {window}: the MQTT messages were not applied once")
            return drain
        finally:
            site.process.stop()
            notify.close()
            broker.stop()


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    windows = [*opts.windows, BASELINE]
    runs: dict[tuple[str, int], list[Drain]] = {}
    for repeat in range(opts.repeats):
        for load in opts.loads:
            prefix, backlog, probe = LOADS[load]
            for window in windows:
                drain = await one_run(window, prefix, backlog, probe)
                runs.setdefault((load, window), []).append(drain)
                print(
                    f"# repeat {repeat + 1} {load:12} window {window:>7}: "
                    f"p99 {drain.p99 * 1000:7.1f} ms, "
                    f"{backlog / drain.drain_s:7.0f} msg/s applied, "
                    f"{backlog / drain.replied_s:7.0f} msg/s replied",
                    file=sys.stderr,
                )
    results: dict[str, Any] = {}
    header = (
        f"{'load':12} {'window':>9} {'tcp p50 ms':>11} {'tcp p99 ms':>11} {'mqtt msg/s':>11} "
        f"{'p99 x base':>11} {'rate x base':>12} {'replied/s':>10} {'x base':>7}"
    )
    print(header)
    for load in opts.loads:
        backlog = LOADS[load][1]
        base = runs[(load, BASELINE)]
        base_p99 = statistics.median(d.p99 for d in base)
        base_rate = statistics.median(backlog / d.drain_s for d in base)
        base_replied = statistics.median(backlog / d.replied_s for d in base)
        for window in windows:
            drains = runs[(load, window)]
            p50 = statistics.median(d.p50 for d in drains)
            p99 = statistics.median(d.p99 for d in drains)
            rate = statistics.median(backlog / d.drain_s for d in drains)
            replied = statistics.median(backlog / d.replied_s for d in drains)
            name = "baseline" if window == BASELINE else str(window)
            results[f"{load}/{name}"] = {
                "tcp_p50_ms": _json_number(p50 * 1000, 1),
                "tcp_p99_ms": _json_number(p99 * 1000, 1),
                "mqtt_msgs_per_s": round(rate),
                "p99_ratio": _json_number(p99 / base_p99, 3),
                "rate_ratio": round(rate / base_rate, 3),
                "replied_msgs_per_s": round(replied),
                "replied_ratio": round(replied / base_replied, 3),
            }
            print(
                f"{load:12} {name:>9} {p50 * 1000:11.1f} {p99 * 1000:11.1f} {rate:11.0f} "
                f"{p99 / base_p99:11.3f} {rate / base_rate:12.3f} {replied:10.0f} "
                f"{replied / base_replied:7.3f}"
            )
    return {
        "bench": "mqtt_fairness",
        "repeats": opts.repeats,
        "backlog": {load: LOADS[load][1] for load in opts.loads},
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }


def _json_number(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--windows", type=lambda s: [int(w) for w in s.split(",")], default=[32, 128]
    )
    parser.add_argument("--loads", type=lambda s: s.split(","), default=list(LOADS))
    opts = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(opts))))


if __name__ == "__main__":
    main()
