"""MQTT client libraries side by side: raw receive + reply throughput and CPU per message.

One private Mosquitto; a load generator (this process, the native codec client) keeps
`--window` QoS 1 messages in flight on `bench/in/{n}` and counts the replies on
`bench/out/{n}`. The responder under test runs in a process of its own and, for each message,
publishes a QoS 1 reply and PUBACKs the message (no state, no commit):

* `paho`:   paho-mqtt via aiomqtt, as gatewayd uses it (`protocols.mqtt_client.ManualAckClient`:
            manual ack, `publish_nowait`, writes coalesced per loop iteration);
* `gmqtt`:  gmqtt (optimistic acks, `publish` from the message callback), if installed
            (`pip install .[bench-mqtt]`);
* `native`: protocols.mqttwire (sans-I/O codec on asyncio.Protocol): `receive`, `ack`,
            `publish_nowait`.

Repeats are interleaved (paho, gmqtt, native, paho, ...); each phase warms up, then measures
replies/s and the responder's CPU (utime+stime from /proc/PID/stat) over `--duration-s`.
Reports medians and ratios to paho, then ONE JSON line.

    python bench/mqtt_clients.py                   # 3 repeats x 3 clients x 3 s
    python bench/mqtt_clients.py --repeats 5 --duration-s 5 --window 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocols.mqttwire.aio import MqttClient  # noqa: E402
from protocols.mqttwire.connection import ConnectOptions  # noqa: E402
from tests.brokers import MosquittoBroker  # noqa: E402

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
TOPICS = 20


# ----------------------------------------------------------------- responders (own process)


async def serve_native(port: int) -> None:
    client = MqttClient("127.0.0.1", port, ConnectOptions("responder-native"), high_water=10_000)
    await client.connect()
    await client.subscribe("bench/in/+", qos=1, timeout=10)
    print("ready", flush=True)
    while True:
        message = await client.receive()
        client.publish_nowait("bench/out/" + message.topic[9:], message.payload, 1)
        client.ack(message.packet_id, message.qos)


async def serve_paho(port: int) -> None:
    from protocols.mqtt_client import ManualAckClient

    client = ManualAckClient(
        "127.0.0.1",
        port,
        high_water=10_000,
        identifier="responder-paho",
        max_inflight_messages=1000,
    )
    client.pending_calls_threshold = 100_000
    async with client:
        await client.subscribe("bench/in/+", qos=1)
        print("ready", flush=True)
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            assert isinstance(payload, bytes)
            mid, done = client.publish_nowait("bench/out/" + topic[9:], payload, 1)
            done.add_done_callback(lambda f: None)
            client.forget_publish(mid)  # nobody waits for it
            client.ack(message.mid, message.qos)


async def serve_gmqtt(port: int) -> None:
    import gmqtt

    client = gmqtt.Client("responder-gmqtt")

    def on_message(client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        client.publish("bench/out/" + topic[9:], payload, qos=1)
        return 0

    client.on_message = on_message
    await client.connect("127.0.0.1", port, version=gmqtt.constants.MQTTv311)
    client.subscribe("bench/in/+", qos=1)
    await asyncio.sleep(0.5)  # gmqtt's subscribe does not wait for the SUBACK
    print("ready", flush=True)
    await asyncio.Event().wait()


SERVERS = {"paho": serve_paho, "gmqtt": serve_gmqtt, "native": serve_native}


# ----------------------------------------------------------------- load (this process)


class Load:
    """Keeps `window` QoS 1 requests in flight; counts replies."""

    def __init__(self, port: int, window: int) -> None:
        self.port = port
        self.window = window
        self.replies = 0
        self._client = MqttClient(
            "127.0.0.1", port, ConnectOptions("load", keepalive=60), high_water=1_000_000
        )
        self._task: asyncio.Task[None] | None = None
        self._next = 0

    async def start(self) -> None:
        await self._client.connect()
        await self._client.subscribe("bench/out/+", qos=0, timeout=10)

    def _send(self) -> None:
        n = self._next = (self._next + 1) % TOPICS
        self._client.publish_nowait(f"bench/in/{n}", b"x" * 64, 1)

    async def run(self) -> None:
        for _ in range(self.window):
            self._send()
        while True:
            await self._client.receive()
            self.replies += 1
            self._send()

    def go(self) -> None:
        self.replies = 0
        self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.disconnect()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


async def _phase(kind: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        kind,
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        if line.strip() != b"ready":
            raise RuntimeError(f"{kind} responder did not start: {line!r}")
        load = Load(port, args.window)
        await load.start()
        load.go()
        await asyncio.sleep(args.warmup_s)
        cpu0, replies0, t0 = _cpu_s(process.pid), load.replies, time.perf_counter()
        await asyncio.sleep(args.duration_s)
        cpu1, replies1, t1 = _cpu_s(process.pid), load.replies, time.perf_counter()
        await load.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        await process.wait()
    replies = replies1 - replies0
    return {
        "msgs_per_s": replies / (t1 - t0),
        "cpu_us_per_msg": (cpu1 - cpu0) / max(replies, 1) * 1e6,
    }


async def bench(args: argparse.Namespace) -> None:
    kinds = [k for k in args.clients.split(",") if k]
    if "gmqtt" in kinds:
        try:
            import gmqtt  # noqa: F401
        except ImportError:
            print("gmqtt not installed (pip install .[bench-mqtt]): left out", file=sys.stderr)
            kinds.remove("gmqtt")
    broker = MosquittoBroker(persistence=False, max_inflight_messages=0)
    broker.start()
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    try:
        for repeat in range(args.repeats):
            for kind in kinds:
                result = await _phase(kind, broker.port, args)
                results[kind].append(result)
                print(
                    f"repeat {repeat + 1} {kind:7s} {result['msgs_per_s']:9.0f} msg/s "
                    f"{result['cpu_us_per_msg']:7.1f} us/msg",
                    file=sys.stderr,
                )
    finally:
        broker.stop()
    medians: dict[str, dict[str, Any]] = {
        k: {
            "msgs_per_s": round(statistics.median(r["msgs_per_s"] for r in rs)),
            "cpu_us_per_msg": round(statistics.median(r["cpu_us_per_msg"] for r in rs), 1),
            "repeats_msgs_per_s": [round(r["msgs_per_s"]) for r in rs],
            "repeats_cpu_us_per_msg": [round(r["cpu_us_per_msg"], 1) for r in rs],
        }
        for k, rs in results.items()
    }
    base = medians.get("paho")
    print("\n| client | replies/s (median) | ratio to paho | responder CPU µs/msg | ratio |")
    print("|---|---:|---:|---:|---:|")
    for kind, m in medians.items():
        ratio = m["msgs_per_s"] / base["msgs_per_s"] if base else float("nan")
        cpu_ratio = m["cpu_us_per_msg"] / base["cpu_us_per_msg"] if base else float("nan")
        m["throughput_ratio_to_paho"] = round(ratio, 3)
        m["cpu_ratio_to_paho"] = round(cpu_ratio, 3)
        print(
            f"| {kind} | {m['msgs_per_s']:,.0f} | {ratio:.2f} | {m['cpu_us_per_msg']:.1f} | "
            f"{cpu_ratio:.2f} |"
        )
    print(
        json.dumps(
            {
                "bench": "mqtt_clients",
                "baseline": "paho",
                "window": args.window,
                "repeats": args.repeats,
                "duration_s": args.duration_s,
                "load_average": os.getloadavg(),
                "clients": medians,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="paho,gmqtt,native")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--serve", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(SERVERS[args.serve](args.port))
        return
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
