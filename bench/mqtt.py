"""MQTT end to end through the REAL daemon: devices -> mosquitto -> gatewayd agent -> reply.

D simulated devices (multiplexed over a few MQTT connections) publish QoS 1 telemetry to
`devices/{id}/telemetry`; a `gatewayd run` child process routes each message to the
`TelemetryEcho` agent (bench/gateway_agents.py), which inserts it into its SQLite database,
updates its state and replies with `conn.send` (QoS 1 to `devices/{id}/cmd`). The reply is
published only after the turn committed and the inbound message is PUBACKed only then.

Baseline in the same run, through the same broker: bench/mqtt_load.py's raw aiomqtt echo
(QoS 0 both ways, no state, no durability), driven by the same device code. For a breakdown
(`--no-bridge` skips it), also bench/mqtt_load.py's `bridge` server: protocols.mqtt.MqttBridge
with an echo handler (QoS 1 in/out, ack after "commit", no agent runtime, no SQLite).

Each server is measured twice:
  max:  closed loop, `--window` messages in flight per device -> msgs/s, p50/p99 round trip;
  half: open loop, publishing at 50% of that server's measured max -> p50/p99 round trip.
Gateway CPU per message = the daemon's utime+stime (/proc/PID/stat, all threads) over the
measured window / replies in the window; the echo process's CPU is reported the same way.

    python bench/mqtt.py                               # ~1 min: baseline + gateway at normal
    python bench/mqtt.py --durability normal,full --repeats 3 --duration-s 5
    python bench/mqtt.py --real-clients --durability normal,full --repeats 3   # see mqtt_real.py

Targets (issue #4): gateway (normal) >= 1.0x the echo's msgs/s, p99 < 20 ms at half the max
rate, <= 100 us gateway CPU per message. Prints a table, then one JSON line.
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
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._gateway import CLOCK_TICKS_PER_S, GatewayDaemon  # noqa: E402
from bench.mqtt_load import COMMAND, NODELAY, TELEMETRY, spawn_ready, spawn_server  # noqa: E402
from protocols.mqtt_settings import parse_broker_url  # noqa: E402
from tests.brokers import MosquittoBroker, free_port  # noqa: E402

TARGET_RATIO = 1.0
TARGET_FULL_RATIO = 0.5
TARGET_HALF_P99_MS = 20.0
TARGET_CPU_US = 100.0
TICK_S = 0.005

GATEWAY_CONFIG = """
[gateway]
state_dir = "state"
log_level = "warning"
drain_timeout = "5s"
[http]
enabled = true
bind = "127.0.0.1:{http_port}"
[agents]
durability = "{durability}"
python_path = ["{repo}"]
hibernate_after = "5m"
[agents.classes.telemetry]
class = "bench.gateway_agents:TelemetryEcho"
[listeners.websocket]
enabled = false
[listeners.binary]
enabled = false
[mqtt]
enabled = true
broker_urls = ["{broker_url}"]
client_id = "{client_id}"
client = "{mqtt_client}"
qos = 1
max_inflight_publishes = {inflight}
max_pending_messages = {pending}
[[mqtt.routes]]
topic = "devices/{{id}}/telemetry"
agent_class = "telemetry"
reply_topic = "devices/{{id}}/cmd"
# Every simulated device is new at start: the new-agent cap would refuse past 600.
max_new_agents_per_minute = 0
"""


class BenchBroker(MosquittoBroker):
    """MosquittoBroker that tells its process id (for its CPU share)."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


async def drop_session(broker_url: str, client_id: str) -> None:
    """End a stopped gateway's persistent session, or the broker keeps queueing every later
    phase's QoS 1 telemetry for it and the next gateway (or the broker) pays for the backlog."""
    address = parse_broker_url(broker_url)
    async with aiomqtt.Client(address.host, address.port, identifier=client_id, clean_session=True):
        pass


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def agent_counters(http_port: int) -> dict[str, float]:
    """The daemon's committed turns and commits so far (its Prometheus /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {
        "gatewayd_agent_commits_total": "commits",
        'gatewayd_agent_turns_total{result="ok"}': "turns",
    }
    counters: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            counters[wanted[name]] = float(value)
    return counters


def quantile_ms(ordered_ns: list[int], q: float) -> float | None:
    if not ordered_ns:
        return None
    return round(ordered_ns[min(len(ordered_ns) - 1, int(q * len(ordered_ns)))] / 1e6, 3)


async def drive(
    broker_url: str,
    *,
    devices: int,
    connections: int,
    qos: int,
    duration_s: float,
    warmup_s: float,
    window: int = 1,
    rate_per_s: float | None = None,
    server_pid: int | None = None,
    broker_pid: int | None = None,
    http_port: int | None = None,
) -> dict[str, Any]:
    """Run the devices; closed loop (`window` in flight each) or open loop at `rate_per_s`.

    Only replies that arrive inside the measured window (after `warmup_s`) count; the server's
    (and the broker's) CPU time is read at the window's start and end, and with `http_port`
    (a gatewayd's metrics) its commits and turns, for the turns per commit.
    """
    address = parse_broker_url(broker_url)
    rtts_ns: list[int] = []
    counting = False
    replies = 0
    sent = 0
    background: set[asyncio.Task[None]] = set()
    groups = [list(range(c, devices, connections)) for c in range(connections)]
    run_id = f"{os.getpid()}-{time.monotonic_ns()}"

    def spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    async with contextlib.AsyncExitStack() as stack:
        clients: list[aiomqtt.Client] = []
        for n, group in enumerate(groups):
            client = aiomqtt.Client(
                address.host,
                address.port,
                identifier=f"bench-dev-{run_id}-{n}",
                max_inflight_messages=max(100, len(group) * window * 2),
                socket_options=NODELAY,
            )
            client.pending_calls_threshold = 1_000_000
            await stack.enter_async_context(client)
            await asyncio.gather(
                *(client.subscribe(COMMAND.replace("{id}", f"d{d}"), qos=qos) for d in group)
            )
            clients.append(client)
        client_of = {d: clients[d % connections] for d in range(devices)}

        async def send(device: int) -> None:
            nonlocal sent
            sent += 1
            payload = f"d{device}:{time.monotonic_ns()}".encode()
            await client_of[device].publish(
                TELEMETRY.replace("{id}", f"d{device}"), payload, qos=qos
            )

        async def receive(client: aiomqtt.Client) -> None:
            nonlocal replies
            async for message in client.messages:
                device, sent_ns = bytes(message.payload).split(b":")
                if counting:
                    rtts_ns.append(time.monotonic_ns() - int(sent_ns))
                    replies += 1
                if rate_per_s is None:
                    spawn(send(int(device[1:])))  # closed loop: keep the window full

        async def paced() -> None:
            began = time.monotonic()
            due = 0
            while True:
                await asyncio.sleep(TICK_S)
                target = int((time.monotonic() - began) * rate_per_s)
                while due < target:
                    spawn(send(due % devices))
                    due += 1

        tasks = [asyncio.create_task(receive(c)) for c in clients]
        if rate_per_s is None:
            for device in range(devices):
                for _ in range(window):
                    spawn(send(device))
        else:
            tasks.append(asyncio.create_task(paced()))
        await asyncio.sleep(warmup_s)
        cpu_before = proc_cpu_s(server_pid) if server_pid else None
        broker_before = proc_cpu_s(broker_pid) if broker_pid else None
        own_before = proc_cpu_s(os.getpid())
        counters_before = await asyncio.to_thread(agent_counters, http_port) if http_port else {}
        sent_before = sent
        counting = True
        started = time.monotonic()
        await asyncio.sleep(duration_s)
        counting = False
        elapsed_s = time.monotonic() - started
        cpu_after = proc_cpu_s(server_pid) if server_pid else None
        broker_after = proc_cpu_s(broker_pid) if broker_pid else None
        own_after = proc_cpu_s(os.getpid())
        counters_after = await asyncio.to_thread(agent_counters, http_port) if http_port else {}
        sent_in_window = sent - sent_before
        for task in tasks:
            task.cancel()
        for task in list(background):
            task.cancel()
        await asyncio.gather(*tasks, *background, return_exceptions=True)
    rtts_ns.sort()
    result: dict[str, Any] = {
        "msgs_per_s": round(replies / elapsed_s, 1),
        "replies": replies,
        "sent": sent_in_window,
        "p50_ms": quantile_ms(rtts_ns, 0.50),
        "p99_ms": quantile_ms(rtts_ns, 0.99),
    }
    if rate_per_s is not None:
        result["offered_msgs_per_s"] = round(rate_per_s, 1)
    if cpu_before is not None and cpu_after is not None and replies:
        result["server_cpu_us_per_msg"] = round((cpu_after - cpu_before) * 1e6 / replies, 1)
        result["server_cpu_util"] = round((cpu_after - cpu_before) / elapsed_s, 3)
    # Where the two cores went: the devices (this process) and the broker share them.
    result["loadgen_cpu_util"] = round((own_after - own_before) / elapsed_s, 3)
    if broker_before is not None and broker_after is not None:
        result["broker_cpu_util"] = round((broker_after - broker_before) / elapsed_s, 3)
        if replies:
            result["broker_cpu_us_per_msg"] = round(
                (broker_after - broker_before) * 1e6 / replies, 1
            )
    commits = counters_after.get("commits", 0) - counters_before.get("commits", 0)
    if commits > 0:
        turns = counters_after.get("turns", 0) - counters_before.get("turns", 0)
        result["turns_per_commit"] = round(turns / commits, 2)
    return result


async def measure_server(
    label: str, start: Callable[[], Any], stop: Callable[[Any], Any], pid_of: Callable[[Any], int],
    qos: int, args: argparse.Namespace, broker: BenchBroker,
) -> dict[str, Any]:  # fmt: skip
    """Max (closed loop) then half of that max (open loop) against one server instance."""
    server = await start()
    try:
        common = dict(
            devices=args.devices, connections=args.connections, qos=qos,
            duration_s=args.duration_s, warmup_s=args.warmup_s, server_pid=pid_of(server),
            broker_pid=broker.pid, http_port=getattr(server, "http_port", None),
        )  # fmt: skip
        top = await drive(broker.url, window=args.window, **common)
        half_rate = top["msgs_per_s"] * 0.5
        half = await drive(broker.url, rate_per_s=half_rate, **common) if half_rate > 0 else {}
        paced = (
            await drive(broker.url, rate_per_s=args.paced_rate, **common) if args.paced_rate else {}
        )
    finally:
        await stop(server)
    print(f"  {label}: max {top['msgs_per_s']} msg/s ({top.get('server_cpu_us_per_msg')} us/msg), "
          f"half p99 {half.get('p99_ms')} ms, paced {paced.get('server_cpu_us_per_msg')} us/msg",
          file=sys.stderr, flush=True)  # fmt: skip
    return {"max": top, "half": half, "paced": paced}


def gateway_variants(args: argparse.Namespace, repeat: int) -> list[tuple[str, str, str, Path]]:
    """(name, durability, client, repo) of each gateway to measure: this tree's and, with
    `--base-repo`, the same from the base tree (`<name>_base`), in alternating order from one
    repeat to the next so that neither always runs first."""
    clients = args.mqtt_clients.split(",")
    variants = []
    for durability, mqtt_client in [(d, c) for d in args.durability.split(",") for c in clients]:
        name = f"gateway_{durability}" + ("" if len(clients) == 1 else f"_{mqtt_client}")
        pair = [(name, durability, mqtt_client, REPO)]
        if args.base_repo is not None:
            pair.append((f"{name}_base", durability, mqtt_client, args.base_repo))
            if repeat % 2:
                pair.reverse()
        variants.extend(pair)
    return variants


async def start_gateway_daemon(
    args: argparse.Namespace, broker_url: str, durability: str, mqtt_client: str, repo: Path
) -> GatewayDaemon:
    """A `gatewayd run` of `repo`'s code (PYTHONPATH) with the TelemetryEcho route."""
    client_id = f"gw-bench-{os.getpid()}-{durability}-{time.monotonic_ns()}"
    http_port = free_port()
    config = GATEWAY_CONFIG.format(
        durability=durability, repo=repo, broker_url=broker_url, client_id=client_id,
        inflight=args.gateway_inflight, pending=args.gateway_pending, mqtt_client=mqtt_client,
        http_port=http_port,
    )  # fmt: skip
    daemon = GatewayDaemon(config, repo=repo)
    daemon.client_id = client_id  # type: ignore[attr-defined]
    daemon.http_port = http_port  # type: ignore[attr-defined]
    await asyncio.to_thread(daemon.start)
    return daemon


async def run_once(args: argparse.Namespace, broker: BenchBroker, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    broker_url = broker.url

    async def start_echo() -> asyncio.subprocess.Process:
        return await spawn_server("baseline", broker_url)

    async def stop_echo(process: asyncio.subprocess.Process) -> None:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)

    async def stop_bridge(process: asyncio.subprocess.Process) -> None:
        await stop_echo(process)
        await drop_session(broker_url, f"gw-bench-{process.pid}")  # mqtt_load's client id

    results["echo"] = await measure_server(
        "echo (baseline)", start_echo, stop_echo, lambda p: p.pid, 0, args, broker
    )
    if args.bridge:

        async def start_bridge() -> asyncio.subprocess.Process:
            return await spawn_server("bridge", broker_url)

        # Decomposition, not a target: the daemon's MQTT transport (QoS 1 in, ack, QoS 1
        # reply) with an echo handler and no agent runtime, from bench/mqtt_load.py.
        results["bridge_echo"] = await measure_server(
            "bridge echo (transport only)", start_bridge, stop_bridge, lambda p: p.pid, 1, args,
            broker,
        )  # fmt: skip
    for name, durability, mqtt_client, repo in gateway_variants(args, repeat):

        async def start_gateway(
            durability: str = durability, mqtt_client: str = mqtt_client, repo: Path = repo
        ) -> GatewayDaemon:
            return await start_gateway_daemon(args, broker_url, durability, mqtt_client, repo)

        async def stop_gateway(daemon: GatewayDaemon) -> None:
            await asyncio.to_thread(daemon.close)
            await drop_session(broker_url, daemon.client_id)  # type: ignore[attr-defined]

        results[name] = await measure_server(
            name, start_gateway, stop_gateway, lambda d: d.pid, 1, args, broker
        )
    return results


async def bench_real_clients(args: argparse.Namespace) -> None:
    """--real-clients: mosquitto_pub/mosquitto_sub processes, timed from outside (mqtt_real)."""
    from bench.mqtt_real import run_real_clients

    broker = BenchBroker(
        persistence=False, max_inflight_messages=1000, max_queued_messages=1_000_000
    )
    broker.start()
    broker_url = broker.url

    async def start_echo() -> asyncio.subprocess.Process:
        return await spawn_server("baseline", broker_url)

    async def stop_echo(process: asyncio.subprocess.Process) -> None:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)

    responders: dict[str, Any] = {"echo": (start_echo, stop_echo)}
    if args.floor:

        async def start_floor() -> asyncio.subprocess.Process:
            script = str(Path(__file__).with_name("mqtt_floor.py"))
            return await spawn_ready("mqtt_floor", script, "--broker", broker_url)

        responders["floor"] = (start_floor, stop_echo)
    clients = args.mqtt_clients.split(",")
    for name, durability, mqtt_client, repo in gateway_variants(args, 0):

        async def start_gateway(
            durability: str = durability, mqtt_client: str = mqtt_client, repo: Path = repo
        ) -> GatewayDaemon:
            return await start_gateway_daemon(args, broker_url, durability, mqtt_client, repo)

        async def stop_gateway(daemon: GatewayDaemon) -> None:
            await asyncio.to_thread(daemon.close)
            await drop_session(broker_url, daemon.client_id)  # type: ignore[attr-defined]

        responders[name] = (start_gateway, stop_gateway)
    try:
        result = await run_real_clients(
            responders, lambda server: server.pid, proc_cpu_s, broker.port,
            repeats=args.repeats, sat_rate=args.sat_rate, warmup_s=args.warmup_s,
            duration_s=args.duration_s, drain_s=args.drain_s,
        )  # fmt: skip
    finally:
        broker.stop()
    medians = result["median"]
    print(
        f"{'responder':<16}{'sat replies/s':>14}{'cpu us/msg':>12}{'half rate/s':>13}"
        f"{'half p50 ms':>13}{'half p99 ms':>13}{'unanswered':>12}"
    )
    for name, m in medians.items():
        sat, half = m["saturated"], m["half"]
        print(
            f"{name:<16}{sat['replies_per_s']!s:>14}{sat['server_cpu_us_per_msg']!s:>12}"
            f"{half.get('offered_per_s')!s:>13}{half.get('p50_ms')!s:>13}"
            f"{half.get('p99_ms')!s:>13}{half.get('unanswered')!s:>12}"
        )
    echo = medians["echo"]["saturated"]["replies_per_s"] or 0
    # An echo that answers (nearly) all it is offered was not saturated: the ratios below
    # then compare offered rates, not capacities (a faster box needs a higher --sat-rate;
    # far above it, the broker itself falls behind and every responder gets less).
    echo_saturated = echo < 0.97 * args.sat_rate
    if not echo_saturated:
        print(
            f"note: the echo answered {echo:.0f} of {args.sat_rate:.0f} msg/s offered: not "
            "saturated; raise --sat-rate for capacity ratios",
            flush=True,
        )
    targets: dict[str, Any] = {}
    for name, m in medians.items():
        if not name.startswith("gateway_"):
            continue
        ratio = round(m["saturated"]["replies_per_s"] / echo, 3) if echo else None
        need = TARGET_RATIO if name.startswith("gateway_normal") else TARGET_FULL_RATIO
        p99 = m["half"].get("p99_ms")
        cpu = m["saturated"]["server_cpu_us_per_msg"]
        targets[name] = {
            "vs_echo_replies_per_s": ratio,
            "ratio_target": need,
            "ratio_met": ratio is not None and ratio >= need,
            "half_echo_rate_p99_met": p99 is not None and p99 < TARGET_HALF_P99_MS,
            "cpu_us_per_msg_met": cpu is not None and cpu <= TARGET_CPU_US,
        }
    print(
        json.dumps(
            {
                "bench": "mqtt",
                "mode": "real-clients",
                "mqtt_clients": clients,
                "publishers": "20 x mosquitto_pub -l -q 1",
                "sat_rate": args.sat_rate,
                "echo_saturated": echo_saturated,
                "duration_s": args.duration_s,
                "repeats": args.repeats,
                "cpus": os.cpu_count(),
                "median": medians,
                "targets": {
                    "half_echo_rate_p99_ms_max": TARGET_HALF_P99_MS,
                    "cpu_us_per_msg_max": TARGET_CPU_US,
                    **targets,
                },
                "runs": result["runs"],
            }
        )
    )


def vs_base(runs: list[dict[str, Any]], server: str) -> dict[str, float | None]:
    """Branch / base ratios of the closed-loop msgs/s and CPU per message (and of the CPU per
    message at `--paced-rate`): the median of the per-repeat ratios (each repeat ran both
    back to back)."""
    ratios: dict[str, list[float]] = {
        "msgs_per_s": [],
        "server_cpu_us_per_msg": [],
        "paced_server_cpu_us_per_msg": [],
    }
    for run in runs:
        for key, values in ratios.items():
            phase = "paced" if key.startswith("paced_") else "max"
            name = key.removeprefix("paced_")
            mine = run[server].get(phase, {}).get(name)
            base = run[f"{server}_base"].get(phase, {}).get(name)
            if mine and base:
                values.append(mine / base)
    return {
        key: round(statistics.median(values), 3) if values else None
        for key, values in ratios.items()
    }


def median_of(runs: list[dict[str, Any]], server: str, phase: str, key: str) -> float | None:
    values = [r[server][phase].get(key) for r in runs if r[server].get(phase)]
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


async def bench(args: argparse.Namespace) -> None:
    broker = BenchBroker(
        persistence=False, max_inflight_messages=1000, max_queued_messages=1_000_000
    )
    broker.start()
    runs: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeats):
            runs.append(await run_once(args, broker, repeat))
    finally:
        broker.stop()

    keys = (
        "msgs_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_msg", "broker_cpu_us_per_msg",
        "turns_per_commit",
    )  # fmt: skip
    servers = list(runs[0])
    medians = {
        server: {
            "max": {k: median_of(runs, server, "max", k) for k in keys},
            "paced": {
                k: median_of(runs, server, "paced", k)
                for k in (
                    "offered_msgs_per_s",
                    "msgs_per_s",
                    "p99_ms",
                    "server_cpu_us_per_msg",
                    "turns_per_commit",
                )
            },
            "half": {
                k: median_of(runs, server, "half", k)
                for k in (
                    "offered_msgs_per_s",
                    "msgs_per_s",
                    "p50_ms",
                    "p99_ms",
                    "server_cpu_us_per_msg",
                    "turns_per_commit",
                )
            },
        }
        for server in servers
    }
    print(
        f"{'server':<24}{'max msg/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/msg':>12}"
        f"{'broker us':>11}{'turns/commit':>14}{'half msg/s':>12}{'half p50':>10}"
        f"{'half p99':>10}{'half cpu us':>13}{'paced cpu us':>14}"
    )
    for server, m in medians.items():
        top, half = m["max"], m["half"]
        print(
            f"{server:<24}{top['msgs_per_s']!s:>11}{top['p50_ms']!s:>9}{top['p99_ms']!s:>9}"
            f"{top['server_cpu_us_per_msg']!s:>12}{top['broker_cpu_us_per_msg']!s:>11}"
            f"{top['turns_per_commit']!s:>14}{half['msgs_per_s']!s:>12}"
            f"{half['p50_ms']!s:>10}{half['p99_ms']!s:>10}{half['server_cpu_us_per_msg']!s:>13}"
            f"{m['paced']['server_cpu_us_per_msg']!s:>14}"
        )
    echo_rate = medians["echo"]["max"]["msgs_per_s"] or 0
    targets: dict[str, Any] = {}
    for server in servers:
        if not server.startswith("gateway_"):
            continue
        m = medians[server]
        ratio = round(m["max"]["msgs_per_s"] / echo_rate, 3) if echo_rate else None
        cpu = m["max"]["server_cpu_us_per_msg"]
        half_p99 = m["half"]["p99_ms"]
        targets[server] = {
            "vs_echo_msgs_per_s": ratio,
            "ratio_met": ratio is not None and ratio >= TARGET_RATIO,
            "half_rate_p99_met": half_p99 is not None and half_p99 < TARGET_HALF_P99_MS,
            "cpu_us_per_msg_met": cpu is not None and cpu <= TARGET_CPU_US,
        }
        base = medians.get(f"{server}_base")
        if base is not None:
            targets[server]["vs_base"] = vs_base(runs, server)
    line = {
        "bench": "mqtt",
        "mqtt_clients": args.mqtt_clients.split(","),
        "devices": args.devices,
        "window": args.window,
        "connections": args.connections,
        "duration_s": args.duration_s,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "median": medians,
        "targets": {
            "ratio_min": TARGET_RATIO,
            "half_rate_p99_ms_max": TARGET_HALF_P99_MS,
            "cpu_us_per_msg_max": TARGET_CPU_US,
            **targets,
        },
        "runs": runs,
    }
    print(json.dumps(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--window", type=int, default=2, help="messages in flight per device")
    parser.add_argument("--connections", type=int, default=4, help="MQTT connections for devices")
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured window per phase")
    parser.add_argument("--warmup-s", type=float, default=1.5)
    parser.add_argument("--durability", default="normal", help="normal, full or normal,full")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--bridge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure mqtt_load's MqttBridge + echo handler (transport cost, no agents)",
    )
    parser.add_argument(
        "--gateway-inflight", type=int, default=100, help="mqtt.max_inflight_publishes"
    )
    parser.add_argument(
        "--gateway-pending", type=int, default=1000, help="mqtt.max_pending_messages"
    )
    parser.add_argument(
        "--mqtt-clients",
        default="native",
        help="the gateway's [mqtt] client: native, aiomqtt or native,aiomqtt (one responder each)",
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=0.0,
        help="also measure every server at this offered msg/s (the same for all: CPU per "
        "message at equal load)",
    )
    parser.add_argument(
        "--base-repo",
        type=Path,
        default=None,
        help="also measure each gateway with this tree's code (e.g. /work/main), interleaved: "
        "<name>_base in the table",
    )
    parser.add_argument(
        "--real-clients",
        action="store_true",
        help="20 mosquitto_pub processes + mosquitto_sub watchers (bench/mqtt_real.py)",
    )
    parser.add_argument(
        "--sat-rate",
        type=float,
        default=8000,
        help="--real-clients: offered msg/s of the saturated phase (the JSON line says whether "
        "the echo fell behind it)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="--real-clients: also run bench/mqtt_floor.py (a bare durable responder, one "
        "SQLite file per device: the floor for the gateway's CPU per message)",
    )
    parser.add_argument(
        "--drain-s", type=float, default=15, help="--real-clients: most to wait for a backlog"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(bench_real_clients(args) if args.real_clients else bench(args))


if __name__ == "__main__":
    main()
