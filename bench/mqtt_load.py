"""MQTT load generator: simulated devices measure telemetry -> reply round trips.

D devices publish telemetry to `devices/{id}/telemetry` and wait for the reply on
`devices/{id}/cmd` (closed loop, `--window` messages in flight per device); the payload
carries the send time, so the round trip is measured from the echoed reply. Two servers
answer, one after the other, through the same broker, in separate processes:

* `baseline`: a raw aiomqtt echo (QoS 0 both ways, no state, no acks to wait for);
* `bridge`:   protocols.mqtt.MqttBridge (QoS 1 in, ack after commit, QoS 1 replies) with an
  echo LinkHandler that resolves each event on the next loop iteration (no storage), i.e. the
  transport's own cost. `--gateway external` skips spawning it: point the devices at a running
  gatewayd whose agent on route devices/{id}/telemetry echoes each message to its link.

    python bench/mqtt_load.py                       # spawns mosquitto, 100 devices, 5 s each
    python bench/mqtt_load.py --devices 1000 --window 2 --duration-s 10
    python bench/mqtt_load.py --broker mqtt://127.0.0.1:1883 --gateway external --modes bridge

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from protocols.link import DedupKey, Link, Outcome  # noqa: E402
from protocols.mqtt import MqttBridge, MqttRoute, MqttSettings  # noqa: E402
from protocols.mqtt_settings import parse_broker_url  # noqa: E402

TELEMETRY = "devices/{id}/telemetry"
COMMAND = "devices/{id}/cmd"
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


# ----------------------------------------------------------------- servers (own process)


class EchoHandler:
    """Resolves every event on the next loop iteration and echoes messages to the link."""

    def _done(self) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, Outcome.APPLIED)
        return future

    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        return self._done()

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        future = self._done()
        future.add_done_callback(lambda _: link.send(data))  # after the "commit"
        return future

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        return self._done()


async def serve_bridge(broker_url: str, client_id: str) -> None:
    settings = MqttSettings(
        broker_urls=(broker_url,),
        client_id=client_id,
        # Every simulated device is new at start: no new-agent cap.
        routes=(MqttRoute(TELEMETRY, "echo", COMMAND, max_new_agents_per_minute=0),),
        max_inflight_publishes=100,
        max_pending_messages=1000,
    )
    bridge = MqttBridge(settings, EchoHandler())
    await bridge.start()
    await bridge.wait_connected(timeout_s=10)
    await _ready_then_wait_for_sigterm()
    await bridge.stop(drain_timeout_s=2)


async def serve_baseline(broker_url: str, client_id: str) -> None:
    address = parse_broker_url(broker_url)
    async with aiomqtt.Client(
        address.host, address.port, identifier=client_id, socket_options=NODELAY
    ) as client:
        client.pending_calls_threshold = 1_000_000
        await client.subscribe(TELEMETRY.replace("{id}", "+"), qos=0)

        async def echo() -> None:
            async for message in client.messages:
                device_id = message.topic.value.split("/")[1]
                await client.publish(COMMAND.replace("{id}", device_id), message.payload, qos=0)

        task = asyncio.create_task(echo())
        await _ready_then_wait_for_sigterm()
        task.cancel()


async def _ready_then_wait_for_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()


# ----------------------------------------------------------------- devices (this process)


async def run_devices(
    broker_url: str, devices: int, window: int, connections: int, qos: int, duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:  # fmt: skip
    address = parse_broker_url(broker_url)
    rtts_ns: list[int] = []
    counting = False
    replies = 0
    in_flight: set[asyncio.Task[None]] = set()

    def start_send(client: aiomqtt.Client, device: int) -> None:
        task = asyncio.create_task(send(client, device))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    groups = [list(range(c, devices, connections)) for c in range(connections)]
    run_id = os.getpid()
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for n, group in enumerate(groups):
            client = aiomqtt.Client(
                address.host,
                address.port,
                identifier=f"bench-dev-{run_id}-{n}",
                max_inflight_messages=max(20, len(group) * window),
                socket_options=NODELAY,
            )
            client.pending_calls_threshold = 1_000_000
            await stack.enter_async_context(client)
            await asyncio.gather(
                *(client.subscribe(COMMAND.replace("{id}", f"d{d}"), qos=qos) for d in group)
            )
            clients.append(client)

        async def send(client: aiomqtt.Client, device: int) -> None:
            payload = f"d{device}:{time.monotonic_ns()}".encode()
            await client.publish(TELEMETRY.replace("{id}", f"d{device}"), payload, qos=qos)

        async def receive(client: aiomqtt.Client) -> None:
            nonlocal replies
            async for message in client.messages:
                device, sent_ns = bytes(message.payload).split(b":")
                if counting:
                    rtts_ns.append(time.monotonic_ns() - int(sent_ns))
                    replies += 1
                start_send(client, int(device[1:]))  # keep the window full

        receivers = [asyncio.create_task(receive(c)) for c in clients]
        for client, group in zip(clients, groups, strict=True):
            for device in group:
                for _ in range(window):
                    start_send(client, device)
        await asyncio.sleep(warmup_s)
        counting = True
        started = time.monotonic()
        await asyncio.sleep(duration_s)
        counting = False
        elapsed = time.monotonic() - started
        for task in receivers:
            task.cancel()
    rtts_ms = sorted(r / 1e6 for r in rtts_ns)
    return {
        "msgs_per_s": round(replies / elapsed, 1),
        "replies": replies,
        "p50_ms": round(statistics.median(rtts_ms), 3) if rtts_ms else None,
        "p99_ms": round(rtts_ms[int(len(rtts_ms) * 0.99) - 1], 3) if rtts_ms else None,
    }


async def spawn_server(mode: str, broker_url: str) -> asyncio.subprocess.Process:
    return await spawn_ready(f"{mode} server", __file__, f"--serve-{mode}", "--broker", broker_url)


async def spawn_ready(name: str, script: str, *args: str) -> asyncio.subprocess.Process:
    """A Python child process, once it printed READY (SIGTERM stops it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, script, *args, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 15)
    if line.strip() != b"READY":
        raise RuntimeError(f"{name} did not start: {line!r}")
    return process


async def bench(args: argparse.Namespace) -> None:
    broker = None
    broker_url = args.broker
    if broker_url is None:
        from tests.brokers import MosquittoBroker

        broker = MosquittoBroker(max_inflight_messages=1000, persistence=False)
        broker.start()
        broker_url = broker.url
    results: dict[str, dict[str, Any]] = {}
    try:
        for mode in args.modes.split(","):
            server = None
            if mode == "baseline" or args.gateway == "spawn":
                server = await spawn_server(mode, broker_url)
            try:
                results[mode] = await run_devices(
                    broker_url, args.devices, args.window, args.connections,
                    qos=0 if mode == "baseline" else 1,
                    duration_s=args.duration_s, warmup_s=args.warmup_s,
                )  # fmt: skip
            finally:
                if server is not None:
                    server.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(server.wait(), 10)
    finally:
        if broker is not None:
            broker.stop()

    print(f"{'mode':<10}{'msgs/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'replies':>10}")
    for mode, r in results.items():
        print(
            f"{mode:<10}{r['msgs_per_s']:>12}{r['p50_ms']!s:>10}{r['p99_ms']!s:>10}{r['replies']:>10}"
        )
    line: dict[str, Any] = {
        "bench": "mqtt_load",
        "devices": args.devices,
        "window": args.window,
        "connections": args.connections,
        "duration_s": args.duration_s,
        "gateway": args.gateway,
        **results,
    }
    if "bridge" in results and "baseline" in results and results["baseline"]["msgs_per_s"]:
        line["bridge_vs_baseline_msgs_per_s"] = round(
            results["bridge"]["msgs_per_s"] / results["baseline"]["msgs_per_s"], 3
        )
    print(json.dumps(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", help="mqtt://host:port (default: spawn a mosquitto)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--window", type=int, default=1, help="messages in flight per device")
    parser.add_argument("--connections", type=int, default=4, help="MQTT connections for devices")
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--modes", default="baseline,bridge")
    parser.add_argument("--gateway", choices=("spawn", "external"), default="spawn")
    parser.add_argument("--serve-bridge", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.serve_bridge:
        asyncio.run(serve_bridge(args.broker, f"gw-bench-{os.getpid()}"))
    elif args.serve_baseline:
        asyncio.run(serve_baseline(args.broker, f"echo-bench-{os.getpid()}"))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
