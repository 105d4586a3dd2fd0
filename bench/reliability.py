"""Reliability through the REAL daemon: SIGKILLs under load, a soak, a full disk, a corrupt file.

A `gatewayd run` child process (bench/_gateway.py) serves one agent class,
`ReliabilityRecorder` (bench/gateway_agents.py: stores each message with its transport and
echoes it back), over MQTT (a private mosquitto), TCP binary frames and WebSocket at once.
The load generator in this process plays three kinds of devices and keeps a ledger:

* MQTT devices publish QoS 1 `devices/m{i}/telemetry`; a message is *acknowledged* when the
  broker PUBACKed it (the gateway's persistent session must then get it into SQLite). Replies
  on `devices/+/cmd` are counted.
* TCP devices follow FRAMES.md (persistent seq, window, resend every unACKed frame after a
  reconnect); a frame is acknowledged when the gateway ACKed it. PUSHes (the replies) are
  ACKed and counted.
* WebSocket dashboards send binary messages one at a time; a message is acknowledged when
  its echo came back.

Phases (each one prints a line to stderr as it ends):

1. max:    closed loop on all three transports for `--max-s`; the sum is the maximum rate.
2. kills:  load at half that rate; `--kills` times: wait 1-3 s, SIGKILL, restart.
3. soak:   the same daemon at half the maximum rate for `--soak-s`; RSS (VmRSS) sampled every
           `--rss-every-s`; least-squares slope after the first fifth (warm-up), in MB per
           10 minutes.
4. disk:   a fresh daemon whose state directory is a small tmpfs (`mount -t tmpfs`, needs
           root); under load the tmpfs is filled until ENOSPC, then freed: acks must stop
           while full, the log must say why, acks must resume, nothing acknowledged is lost.
5. corrupt: a fresh daemon; one MQTT device's agent file is overwritten with garbage while the
           daemon is stopped; after the restart that agent must be quarantined (a log line
           naming the file) while every other agent keeps serving.

After each daemon's last phase the load stops, the ledger waits until the daemon has caught
up (or `--settle-s` passed), the daemon is stopped with SIGTERM and the agents' SQLite files
are read directly: lost = acknowledged but not stored; applied twice = a TCP frame stored more
than once; replies dropped = committed MQTT/TCP messages whose echo never arrived.

    python bench/reliability.py                         # ~15 min: 20 kills, 10 min soak
    python bench/reliability.py --kills 3 --soak-s 60   # development run, ~2 min

Debugging: RELIABILITY_KEEP_LOGS=DIR keeps each daemon's log there; RELIABILITY_PAUSE_S=N
pauses before the disk-full phase unmounts its tmpfs (inspect the daemon and the files).

Targets (issue 8): 0 acknowledged messages lost, 0 frames applied twice, 0 device replies
dropped, RSS slope < 1 MB per 10 minutes after warm-up. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from websockets.asyncio.client import connect as ws_connect

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._gateway import GatewayDaemon  # noqa: E402
from gatewayd.agents.storage import agent_db_path  # noqa: E402
from protocols.frames import (  # noqa: E402
    Ack,
    Close,
    Data,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    HelloOk,
    Ping,
    Pong,
    Push,
    encode,
)
from tests.brokers import MosquittoBroker, free_port  # noqa: E402

AGENT_CLASS = "rel"
TARGET_RSS_SLOPE_MB_PER_10MIN = 1.0
TICK_S = 0.01
RECONNECT_S = 0.2
PUSH_WAIT_S = 30.0  # after the stop, how long a TCP device waits for the pushes it is owed
PUBLISH_TIMEOUT_S = 60.0

GATEWAY_CONFIG = """
[gateway]
state_dir = "{state_dir}"
log_level = "info"
drain_timeout = "10s"
[http]
enabled = false
[agents]
durability = "normal"
python_path = ["{repo}"]
hibernate_after = "10m"
[agents.classes.{agent_class}]
class = "bench.gateway_agents:ReliabilityRecorder"
[listeners.websocket]
enabled = true
bind = "127.0.0.1:{ws_port}"
[listeners.binary]
enabled = true
bind = "127.0.0.1:{tcp_port}"
agent_class = "{agent_class}"
secrets_file = "devices.toml"
max_unacked = 64
[mqtt]
enabled = true
broker_urls = ["{broker_url}"]
client_id = "{client_id}"
qos = 1
reconnect_min = "100ms"
reconnect_max = "1s"
[[mqtt.routes]]
topic = "devices/{{id}}/telemetry"
agent_class = "{agent_class}"
reply_topic = "devices/{{id}}/cmd"
"""


# ------------------------------------------------------------------------------ the ledger


@dataclass
class Ledger:
    """What the devices know: what was acknowledged to them and which replies arrived."""

    acked: dict[str, set[bytes]] = field(
        default_factory=lambda: {"mqtt": set(), "tcp": set(), "ws": set()}
    )
    replies: dict[str, set[bytes]] = field(default_factory=lambda: {"mqtt": set(), "tcp": set()})
    rejected: dict[str, set[bytes]] = field(default_factory=lambda: {"mqtt": set(), "tcp": set()})
    sent = 0
    publish_failed = 0

    def acked_total(self) -> int:
        return sum(len(s) for s in self.acked.values())

    def snapshot(self) -> tuple[int, int]:
        return self.acked_total(), sum(len(s) for s in self.replies.values())


class Pacer:
    """Hands out send tokens to `devices` round-robin at `rate_per_s` (open loop), or keeps
    every device topped up with `window` outstanding messages (closed loop, rate None)."""

    def __init__(self, devices: int, rate_per_s: float | None) -> None:
        self.rate_per_s = rate_per_s
        self.budget = [0] * devices
        self.wake = [asyncio.Event() for _ in range(devices)]

    async def run(self) -> None:
        if self.rate_per_s is None or self.rate_per_s <= 0 or not self.budget:
            return
        began, given = time.monotonic(), 0
        while True:
            await asyncio.sleep(TICK_S)
            due = int((time.monotonic() - began) * self.rate_per_s)
            while given < due:
                device = given % len(self.budget)
                self.budget[device] += 1
                self.wake[device].set()
                given += 1

    def closed_loop(self) -> bool:
        return self.rate_per_s is None

    def take(self, device: int) -> bool:
        if self.rate_per_s is None:
            return True
        if self.budget[device] > 0:
            self.budget[device] -= 1
            return True
        self.wake[device].clear()
        return False


# ------------------------------------------------------------------------------ devices


class MqttDevices:
    """`count` MQTT devices publishing over one connection, and one reply listener; both stay
    connected from `open()` to `close()` (replies keep arriving after the load stopped)."""

    def __init__(self, broker: MosquittoBroker, count: int, ledger: Ledger, window: int) -> None:
        self.broker, self.count, self.ledger, self.window = broker, count, ledger, window
        self.next_n = [0] * count
        self.outstanding = [0] * count  # closed loop: published, echo not back yet
        self.freed = [asyncio.Event() for _ in range(count)]
        self.publishes: set[asyncio.Task[None]] = set()
        self._stack = contextlib.AsyncExitStack()
        self._receiver: asyncio.Task[None] | None = None

    async def open(self) -> None:
        run_id = f"{os.getpid()}-{time.monotonic_ns()}"
        listener = aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=f"rel-replies-{run_id}"
        )
        listener.pending_calls_threshold = 1_000_000
        await self._stack.enter_async_context(listener)
        await listener.subscribe("devices/+/cmd", qos=1)
        self.publisher = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=f"rel-pub-{run_id}",
            max_inflight_messages=1000,
        )
        self.publisher.pending_calls_threshold = 1_000_000
        await self._stack.enter_async_context(self.publisher)
        self._receiver = asyncio.create_task(self._receive(listener))

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for task in list(self.publishes):
            task.cancel()
        await asyncio.gather(*self.publishes, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    async def run(self, pacer: Pacer, stop: asyncio.Event) -> None:
        """Publish until `stop`, then wait for the broker's PUBACKs of what was published."""
        if self.count:
            await asyncio.gather(*(self._device(d, pacer, stop) for d in range(self.count)))
        while self.publishes:
            await asyncio.gather(*list(self.publishes), return_exceptions=True)

    async def _device(self, d: int, pacer: Pacer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if pacer.closed_loop():
                if self.outstanding[d] >= self.window:
                    self.freed[d].clear()
                    await wait_either(self.freed[d], stop)
                    continue
            elif not pacer.take(d):
                await wait_either(pacer.wake[d], stop)
                continue
            self.next_n[d] += 1
            body = f"m:{d}:{self.next_n[d]}".encode()
            self.outstanding[d] += 1
            self.ledger.sent += 1
            task = asyncio.create_task(self._publish(d, body))
            self.publishes.add(task)
            task.add_done_callback(self.publishes.discard)

    async def _publish(self, d: int, body: bytes) -> None:
        try:
            await self.publisher.publish(
                f"devices/m{d}/telemetry", body, qos=1, timeout=PUBLISH_TIMEOUT_S
            )
        except aiomqtt.MqttError:
            # Not PUBACKed: not acknowledged, so not counted (a busy 2-core box can be slow).
            self.ledger.publish_failed += 1
            self.outstanding[d] = max(0, self.outstanding[d] - 1)
            self.freed[d].set()
            return
        self.ledger.acked["mqtt"].add(body)  # the broker PUBACKed it

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            body = bytes(message.payload)  # type: ignore[arg-type]
            if body not in self.ledger.replies["mqtt"]:
                self.ledger.replies["mqtt"].add(body)
                d = int(body.split(b":")[1])
                self.outstanding[d] = max(0, self.outstanding[d] - 1)
                self.freed[d].set()


class TcpDevice:
    """One binary-frame device as FRAMES.md asks of firmware: persistent seqs, a window,
    every unACKed frame resent (RESEND flag, same seq) after a reconnect, pushes ACKed."""

    def __init__(self, port: int, index: int, ledger: Ledger, window: int) -> None:
        self.port, self.index, self.ledger, self.window = port, index, ledger, window
        self.device_id, self.secret = f"t{index}", f"secret-{index}"
        self.next_seq = 1
        self.unacked: dict[int, bytes] = {}
        self.progress = asyncio.Event()
        self.connects = 0
        # Frames ACKed whose PUSH has not arrived yet: the agent pushes one per applied frame,
        # after the same commit as the ACK, so it may come just after the device's last ACK.
        # A device that hung up then would leave it in the gateway's outbox (sent on the next
        # connection), which the verdict would count as a dropped reply.
        self.awaiting_push: set[bytes] = set()
        self.push_wait_until = 0.0

    def done(self, stop: asyncio.Event) -> bool:
        """Stopped, nothing unACKed, and every push received (or PUSH_WAIT_S after the stop)."""
        if not stop.is_set() or self.unacked:
            return False
        if not self.push_wait_until:
            self.push_wait_until = time.monotonic() + PUSH_WAIT_S
        return not self.awaiting_push or time.monotonic() > self.push_wait_until

    def body(self, seq: int) -> bytes:
        return f"t:{self.index}:{seq}".encode()

    async def run(self, pacer: Pacer, stop: asyncio.Event) -> None:
        while not self.done(stop):
            with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
                await self._session(pacer, stop)  # (TimeoutError is an OSError)
            if not self.done(stop):
                await asyncio.sleep(RECONNECT_S)

    async def _session(self, pacer: Pacer, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
        try:
            decoder = FrameDecoder()
            writer.write(encode(Hello(self.device_id, self.secret)))
            hello_ok = False
            while not hello_ok:
                data = await asyncio.wait_for(reader.read(65536), 10)
                if not data:
                    raise ConnectionError("closed before HELLO_OK")
                for frame in decoder.feed(data):
                    if isinstance(frame, HelloOk):
                        hello_ok = True
                    elif isinstance(frame, Error):
                        raise ConnectionError(f"HELLO refused: {frame.code} {frame.message}")
            self.connects += 1
            for seq in sorted(self.unacked):
                writer.write(encode(Data(seq, self.unacked[seq], resend=True)))
            reading = asyncio.create_task(self._read(reader, writer, decoder))
            try:
                while not reading.done():
                    if self.done(stop):
                        writer.write(encode(Close(1000, "bench done")))
                        return
                    if stop.is_set() or len(self.unacked) >= self.window:
                        await wait_either(self.progress, reading, timeout_s=0.5)
                        self.progress.clear()
                        continue
                    if not pacer.take(self.index):
                        await wait_either(pacer.wake[self.index], reading, stop, timeout_s=0.5)
                        continue
                    seq = self.next_seq
                    self.next_seq += 1
                    self.unacked[seq] = self.body(seq)
                    self.ledger.sent += 1
                    writer.write(encode(Data(seq, self.unacked[seq])))
                await reading  # raises why the connection ended
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        finally:
            writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("gateway closed the connection")
            for frame in decoder.feed(data):
                if isinstance(frame, Ack):
                    body = self.unacked.pop(frame.seq, None)
                    if body is not None:
                        self.ledger.acked["tcp"].add(body)
                        if body not in self.ledger.replies["tcp"]:
                            self.awaiting_push.add(body)
                    self.progress.set()
                elif isinstance(frame, Push):
                    self.ledger.replies["tcp"].add(bytes(frame.payload))
                    self.awaiting_push.discard(bytes(frame.payload))
                    self.progress.set()
                    writer.write(encode(Ack(frame.seq)))
                elif isinstance(frame, Ping):
                    writer.write(encode(Pong(frame.seq)))
                elif isinstance(frame, Error):
                    if frame.code == ErrorCode.REJECTED and frame.seq in self.unacked:
                        # FRAMES.md: a rejected frame is dropped by the device.
                        self.ledger.rejected["tcp"].add(self.unacked.pop(frame.seq))
                elif isinstance(frame, Close):
                    raise ConnectionError(f"gateway closed: {frame}")


class WsDashboard:
    """A WebSocket client sending binary messages one at a time; acknowledged = echoed."""

    def __init__(self, port: int, index: int, ledger: Ledger) -> None:
        self.port, self.index, self.ledger = port, index, ledger
        self.n = 0

    async def run(self, pacer: Pacer, stop: asyncio.Event) -> None:
        pending: bytes | None = None
        url = f"ws://127.0.0.1:{self.port}/agents/{AGENT_CLASS}/w{self.index}"
        while not stop.is_set():
            try:
                async with ws_connect(url, open_timeout=5, close_timeout=1) as ws:
                    while not stop.is_set():
                        if pending is None:
                            if not pacer.take(self.index):
                                await wait_either(pacer.wake[self.index], stop, timeout_s=0.5)
                                continue
                            self.n += 1
                            pending = f"w:{self.index}:{self.n}".encode()
                            self.ledger.sent += 1
                        await ws.send(pending)  # resent after a reconnect (maybe twice)
                        while True:
                            reply = await asyncio.wait_for(ws.recv(), 10)
                            if reply == pending:
                                self.ledger.acked["ws"].add(pending)
                                pending = None
                                break
            except Exception:  # OSError, TimeoutError, websockets' ConnectionClosed & co
                if not stop.is_set():
                    await asyncio.sleep(RECONNECT_S)


async def wait_either(*waitables: Any, timeout_s: float | None = None) -> None:
    """Until any event is set / any task is done (or `timeout_s`)."""
    waiters = [
        asyncio.ensure_future(w.wait()) if isinstance(w, asyncio.Event) else w for w in waitables
    ]
    own = [w for w, original in zip(waiters, waitables, strict=True) if w is not original]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in own:
            waiter.cancel()


# ------------------------------------------------------------------------------ the site


@dataclass
class Shape:
    mqtt_devices: int
    tcp_devices: int
    ws_clients: int
    mqtt_window: int
    tcp_window: int


class Site:
    """The broker, one daemon config (ports, state dir) and the device fleet's ledger."""

    def __init__(self, broker: MosquittoBroker, shape: Shape, state_dir: Path | None = None):
        self.broker = broker
        self.shape = shape
        self.ledger = Ledger()
        self.ws_port, self.tcp_port = free_port(), free_port()
        self.client_id = f"gw-rel-{os.getpid()}-{time.monotonic_ns()}"
        secrets = "".join(f'"t{i}" = "secret-{i}"\n' for i in range(shape.tcp_devices))
        self._state_dir_arg = str(state_dir) if state_dir is not None else "state"
        self.daemon = GatewayDaemon(self._config(), files={"devices.toml": secrets})
        self.state_dir = state_dir if state_dir is not None else self.daemon.directory / "state"
        self.tcp = [TcpDevice(self.tcp_port, i, self.ledger, shape.tcp_window)
                    for i in range(shape.tcp_devices)]  # fmt: skip
        self.mqtt = MqttDevices(broker, shape.mqtt_devices, self.ledger, shape.mqtt_window)
        self.ws = [WsDashboard(self.ws_port, i, self.ledger) for i in range(shape.ws_clients)]
        self.kills = 0
        self.restart_s: list[float] = []
        self._loads: list[tuple[asyncio.Event, asyncio.Task[Any]]] = []

    def _config(self) -> str:
        return GATEWAY_CONFIG.format(
            state_dir=self._state_dir_arg, repo=REPO, agent_class=AGENT_CLASS,
            ws_port=self.ws_port, tcp_port=self.tcp_port, broker_url=self.broker.url,
            client_id=self.client_id,
        )  # fmt: skip

    async def open(self) -> None:
        """Start the daemon (its MQTT session exists before anything is published), then the
        MQTT devices."""
        await asyncio.to_thread(self.start)
        # READY=1 comes before the MQTT subscription: a message published before it would be
        # PUBACKed by the broker and routed to nobody (later restarts keep the session).
        deadline = time.monotonic() + 30
        while "mqtt: connected" not in self.daemon.log_tail(10**9):
            if time.monotonic() > deadline:
                raise RuntimeError(f"gatewayd never connected to MQTT: {self.daemon.log_tail()}")
            await asyncio.sleep(0.05)
        await self.mqtt.open()

    async def close(self) -> None:
        if os.environ.get("RELIABILITY_KEEP_LOGS"):
            keep = Path(os.environ["RELIABILITY_KEEP_LOGS"]) / f"{self.client_id}.log"
            keep.write_text(self.daemon.log_tail(10**9))
        for stop, load in self._loads:  # a phase that failed half-way left its load running
            stop.set()
            load.cancel()
        await asyncio.gather(*(load for _, load in self._loads), return_exceptions=True)
        await self.mqtt.close()
        await asyncio.to_thread(self.daemon.close)

    def start(self) -> None:
        began = time.monotonic()
        self.daemon.start()
        self.restart_s.append(time.monotonic() - began)

    def sigkill(self) -> None:
        assert self.daemon.proc is not None
        self.daemon.proc.kill()
        self.daemon.proc.wait()
        self.kills += 1

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.daemon.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def db_path(self, agent_id: str) -> Path:
        return agent_db_path(self.state_dir, AGENT_CLASS, agent_id)

    def agent_ids(self) -> list[str]:
        s = self.shape
        return ([f"m{i}" for i in range(s.mqtt_devices)] + [f"t{i}" for i in range(s.tcp_devices)]
                + [f"w{i}" for i in range(s.ws_clients)])  # fmt: skip

    def stored(self, skip: frozenset[str] = frozenset()) -> Counter[tuple[str, bytes]]:
        """(transport, body) -> times stored, read from every agent's SQLite file."""
        rows: Counter[tuple[str, bytes]] = Counter()
        for agent_id in self.agent_ids():
            path = self.db_path(agent_id)
            if agent_id in skip or not path.exists():
                continue
            try:
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                    for transport, body in db.execute("SELECT transport, body FROM messages"):
                        rows[(transport, bytes(body))] += 1
            except sqlite3.Error as err:
                print(f"  cannot read {path}: {err}", file=sys.stderr)
        return rows

    async def load(self, rates: dict[str, float | None], stop: asyncio.Event) -> asyncio.Task[Any]:
        """Start every device; returns the task that ends once `stop` is set and the devices
        have nothing unacknowledged left (TCP) or are idle."""
        pacers = {
            "mqtt": Pacer(self.shape.mqtt_devices, rates["mqtt"]),
            "tcp": Pacer(self.shape.tcp_devices, rates["tcp"]),
            "ws": Pacer(self.shape.ws_clients, rates["ws"]),
        }
        pacing = [asyncio.create_task(p.run()) for p in pacers.values()]
        devices = [asyncio.create_task(self.mqtt.run(pacers["mqtt"], stop))]
        devices += [asyncio.create_task(t.run(pacers["tcp"], stop)) for t in self.tcp]
        devices += [asyncio.create_task(w.run(pacers["ws"], stop)) for w in self.ws]

        async def until_done() -> None:
            try:
                await asyncio.gather(*devices)
            finally:
                for task in [*pacing, *devices]:
                    task.cancel()
                await asyncio.gather(*pacing, *devices, return_exceptions=True)

        task = asyncio.create_task(until_done())
        self._loads.append((stop, task))
        return task

    async def settle(self, settle_s: float, skip: frozenset[str] = frozenset()) -> bool:
        """Until every acknowledged MQTT message is stored and every reply seen, or `settle_s`.
        The TCP devices finish on their own (they stop once nothing is unACKed)."""
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            stored = await asyncio.to_thread(self.stored, skip)
            mqtt_stored = {b for (t, b) in stored if t == "mqtt"}
            acked = {b for b in self.ledger.acked["mqtt"] if not skipped(b, skip)}
            tcp_stored = {b for (t, b) in stored if t == "tcp"}
            replies_ok = (
                mqtt_stored <= self.ledger.replies["mqtt"]
                and tcp_stored <= (self.ledger.replies["tcp"])
            )
            if acked <= mqtt_stored and replies_ok:
                return True
            await asyncio.sleep(1.0)
        return False


def skipped(body: bytes, skip: frozenset[str]) -> bool:
    kind, index = body.split(b":")[:2]
    return f"{kind.decode()}{index.decode()}" in skip


def verdict(site: Site, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Read the SQLite files of a stopped daemon and compare them with the ledger."""
    stored = site.stored(skip)
    ledger = site.ledger
    result: dict[str, Any] = {}
    lost_total = 0
    for transport in ("mqtt", "tcp", "ws"):
        acked = {b for b in ledger.acked[transport] if not skipped(b, skip)}
        have = {b for (t, b) in stored if t == transport}
        lost = sorted(acked - have)
        lost_total += len(lost)
        result[f"{transport}_acked"] = len(acked)
        result[f"{transport}_lost"] = len(lost)
        if lost:
            result[f"{transport}_lost_examples"] = [b.decode() for b in lost[:5]]
    twice = [b for (t, b), n in stored.items() if t == "tcp" and n > 1]
    result["tcp_applied_twice"] = len(twice)
    result["mqtt_redelivered_applied_again"] = sum(
        n - 1 for (t, _b), n in stored.items() if t == "mqtt" and n > 1
    )
    dropped_total = 0
    for transport in ("mqtt", "tcp"):
        committed = {b for (t, b) in stored if t == transport}
        dropped = committed - ledger.replies[transport]
        dropped_total += len(dropped)
        result[f"{transport}_replies_expected"] = len(committed)
        result[f"{transport}_replies_dropped"] = len(dropped)
    result["tcp_rejected"] = len(ledger.rejected["tcp"])
    result["mqtt_publish_failed"] = ledger.publish_failed
    result["lost"] = lost_total
    result["replies_dropped"] = dropped_total
    return result


# ------------------------------------------------------------------------------ phases


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def phase_max(site: Site, max_s: float) -> dict[str, float]:
    """Closed loop on every transport; returns each transport's acknowledged msgs/s."""
    stop = asyncio.Event()
    load = await site.load({"mqtt": None, "tcp": None, "ws": None}, stop)
    await asyncio.sleep(1.0)  # warm-up: agents created, connections up
    before = {t: len(s) for t, s in site.ledger.acked.items()}
    began = time.monotonic()
    await asyncio.sleep(max_s)
    elapsed = time.monotonic() - began
    rates = {t: round((len(s) - before[t]) / elapsed, 1) for t, s in site.ledger.acked.items()}
    stop.set()
    await asyncio.wait_for(load, 60)
    return rates


async def phase_kills(
    site: Site, rates: dict[str, float | None], kills: int, rng: random.Random
) -> tuple[asyncio.Event, asyncio.Task[Any]]:
    stop = asyncio.Event()
    load = await site.load(rates, stop)
    for k in range(kills):
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        site.sigkill()
        await asyncio.to_thread(site.start)
        log(f"kill {k + 1}/{kills}: restarted in {site.restart_s[-1]:.2f}s, "
            f"{site.ledger.acked_total()} acknowledged so far")  # fmt: skip
    return stop, load


async def phase_soak(site: Site, soak_s: float, every_s: float) -> dict[str, Any]:
    samples: list[tuple[float, int]] = []
    began = time.monotonic()
    acked_before = site.ledger.acked_total()
    while True:
        elapsed = time.monotonic() - began
        samples.append((elapsed, site.rss_bytes()))
        if elapsed >= soak_s:
            break
        await asyncio.sleep(min(every_s, soak_s - elapsed))
    warm = samples[len(samples) // 5 :]
    slope = rss_slope_mb_per_10min(warm)
    return {
        "soak_s": round(samples[-1][0], 1),
        "acked_msgs_per_s": round((site.ledger.acked_total() - acked_before) / samples[-1][0], 1),
        "rss_mb_first": round(samples[0][1] / 1e6, 2),
        "rss_mb_after_warmup": round(warm[0][1] / 1e6, 2),
        "rss_mb_last": round(samples[-1][1] / 1e6, 2),
        "rss_slope_mb_per_10min": slope,
        "rss_samples": [(round(t, 1), round(b / 1e6, 2)) for t, b in samples],
    }


def rss_slope_mb_per_10min(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of RSS over time, MB per 600 s."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (b - mean_b) for t, b in samples)
    return round(cov / var * 600 / 1e6, 3)


async def run_main(args: argparse.Namespace, broker: MosquittoBroker) -> dict[str, Any]:
    """Phases 1-3 on one daemon."""
    shape = Shape(args.mqtt_devices, args.tcp_devices, args.ws_clients, args.mqtt_window,
                  args.tcp_window)  # fmt: skip
    site = Site(broker, shape)
    rng = random.Random(args.seed)
    try:
        await site.open()
        top = await phase_max(site, args.max_s)
        total = sum(top.values())
        log(f"max: {top} (total {total:.0f} msgs/s)")
        half: dict[str, float | None] = {t: r * 0.5 for t, r in top.items()}
        stop, load = await phase_kills(site, half, args.kills, rng)
        soak = await phase_soak(site, args.soak_s, args.rss_every_s)
        log(f"soak: {soak['acked_msgs_per_s']} msgs/s, RSS slope "
            f"{soak['rss_slope_mb_per_10min']} MB/10min")  # fmt: skip
        stop.set()
        await asyncio.wait_for(load, args.settle_s + 30)
        settled = await site.settle(args.settle_s)
        await asyncio.to_thread(site.daemon.stop)
        result = verdict(site)
        result.update(
            settled=settled,
            kills=site.kills,
            max_msgs_per_s=top,
            max_total_msgs_per_s=round(total, 1),
            half_rate_msgs_per_s=round(total / 2, 1),
            restart_s_max=round(max(site.restart_s[1:] or [0]), 2),
            tcp_reconnects=sum(t.connects for t in site.tcp),
            soak=soak,
        )
        return result
    finally:
        await site.close()


# -- disk full


def mount_tmpfs(path: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of `size_mb` at `path`; the reason it could not, or None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "not root: mounting a tmpfs needs CAP_SYS_ADMIN"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {done.stderr.strip()}"
    return None


def fill(path: Path) -> int:
    """Write `path` until the file system says ENOSPC; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as filler:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    filler.write(block)
                except OSError:
                    break
                written += chunk
    return written


async def acks_within(site: Site, seconds: float) -> int:
    """Acks (TCP ACKs + echoed WebSocket messages + MQTT replies) seen during `seconds`."""
    ledger = site.ledger
    before = len(ledger.acked["tcp"]) + len(ledger.acked["ws"]) + len(ledger.replies["mqtt"])
    await asyncio.sleep(seconds)
    after = len(ledger.acked["tcp"]) + len(ledger.acked["ws"]) + len(ledger.replies["mqtt"])
    return after - before


async def run_disk_full(args: argparse.Namespace, broker: MosquittoBroker) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="gatewayd-diskfull-"))
    state = root / "state"
    why_not = mount_tmpfs(state, args.tmpfs_mb)
    if why_not is not None:
        return {"skipped": why_not}
    shape = Shape(4, 4, 2, args.mqtt_window, args.tcp_window)
    site = Site(broker, shape, state_dir=state)
    rates: dict[str, float | None] = {"mqtt": 100.0, "tcp": 100.0, "ws": 10.0}
    filler = state / "filler"
    result: dict[str, Any] = {"tmpfs_mb": args.tmpfs_mb}
    try:
        await site.open()
        stop = asyncio.Event()
        load = await site.load(rates, stop)
        await asyncio.sleep(3.0)
        log_mark = len(site.daemon.log_tail(10**9))
        result["filled_bytes"] = await asyncio.to_thread(fill, filler)
        full_at = time.monotonic()
        # Commits that still fit (SQLite reuses WAL space) may go through for a moment.
        result["acks_first_3s_full"] = await acks_within(site, 3.0)
        result["acks_next_5s_full"] = await acks_within(site, 5.0)
        full_log = site.daemon.log_tail(10**9)[log_mark:]
        result["log_says_full"] = next(
            (line for line in full_log.splitlines() if "full" in line.lower()), None
        )
        result["full_log_lines"] = len(full_log.splitlines())
        filler.unlink()
        freed_at = time.monotonic()
        result["free_mb_after_freeing"] = round(shutil.disk_usage(state).free / 1e6, 1)
        log(f"disk full for {freed_at - full_at:.1f}s: {result}")
        result["full_s"] = round(freed_at - full_at, 1)
        before = site.ledger.snapshot()
        while site.ledger.snapshot() == before and time.monotonic() - freed_at < 60:
            await asyncio.sleep(0.05)
        result["recovered_after_s"] = (
            round(time.monotonic() - freed_at, 2) if site.ledger.snapshot() != before else None
        )
        result["log_says_recovered"] = None
        while time.monotonic() - freed_at < 15:  # the daemon probes for space every second
            recovered_log = site.daemon.log_tail(10**9)[log_mark + len(full_log) :]
            line = next((x for x in recovered_log.splitlines() if "disk space is back" in x), None)
            if line is not None:
                result["log_says_recovered"] = line
                result["log_recovered_after_s"] = round(time.monotonic() - freed_at, 2)
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.wait_for(load, args.settle_s + 30)
        result["settled"] = await site.settle(args.settle_s)
        await asyncio.to_thread(site.daemon.stop)
        result.update(verdict(site))
        return result
    finally:
        if os.environ.get("RELIABILITY_PAUSE_S"):  # debugging: inspect the daemon and tmpfs
            log(f"pausing: daemon pid {site.daemon.pid}, state {state}")
            await asyncio.sleep(float(os.environ["RELIABILITY_PAUSE_S"]))
        usage = subprocess.run(["du", "-ab", str(state)], capture_output=True, text=True).stdout
        log(
            f"disk full phase: {shutil.disk_usage(state).free} bytes free at the end; largest: "
            + "; ".join(sorted(usage.splitlines(), key=lambda row: -int(row.split()[0]))[:6])
        )
        await site.close()
        subprocess.run(["umount", "-l", str(state)], capture_output=True)
        with contextlib.suppress(OSError):
            state.rmdir()
            root.rmdir()


# -- corruption


def corrupt(path: Path) -> None:
    """Garbage over the first 8 KiB (the header and the first pages); WAL files removed."""
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    with open(path, "r+b") as db:
        db.write(random.Random(8).randbytes(8192))


async def run_corrupt(args: argparse.Namespace, broker: MosquittoBroker) -> dict[str, Any]:
    shape = Shape(6, 3, 2, args.mqtt_window, args.tcp_window)
    site = Site(broker, shape)
    rates: dict[str, float | None] = {"mqtt": 120.0, "tcp": 60.0, "ws": 10.0}
    victim = "m0"
    result: dict[str, Any] = {"agent": f"{AGENT_CLASS}/{victim}"}
    try:
        await site.open()
        stop = asyncio.Event()
        load = await site.load(rates, stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(site.daemon.stop)  # devices keep going; the broker queues
        path = site.db_path(victim)
        corrupt(path)
        result["file"] = str(path)
        log_mark = len(site.daemon.log_tail(10**9))
        await asyncio.to_thread(site.start)
        cpu_before, began = site.daemon.cpu_s(), time.monotonic()
        served_before = len(site.ledger.acked["tcp"]) + len(site.ledger.replies["mqtt"])
        await asyncio.sleep(args.corrupt_s)
        served = len(site.ledger.acked["tcp"]) + len(site.ledger.replies["mqtt"]) - served_before
        result["daemon_cpu_util"] = round((site.daemon.cpu_s() - cpu_before)
                                          / (time.monotonic() - began), 3)  # fmt: skip
        result["others_served_msgs"] = served
        text = site.daemon.log_tail(10**9)[log_mark:]
        lines = text.splitlines()
        naming = [line for line in lines if path.name in line]
        result["log_lines_naming_file"] = len(naming)
        result["log_quarantine_line"] = next(
            (line for line in naming if "quarantin" in line.lower()), naming[0] if naming else None
        )
        result["log_lines_total"] = len(lines)
        stop.set()
        await asyncio.wait_for(load, args.settle_s + 30)
        skip = frozenset({victim})
        result["settled"] = await site.settle(args.settle_s, skip)
        result["victim_messages_refused"] = sum(
            1 for b in site.ledger.acked["mqtt"] if skipped(b, skip)
        )
        await asyncio.to_thread(site.daemon.stop)
        result.update(verdict(site, skip))
        result["quarantined"] = result["log_quarantine_line"] is not None
        return result
    finally:
        await site.close()


# ------------------------------------------------------------------------------ main


def table(line: dict[str, Any]) -> str:
    main, disk, bad = line["kills_and_soak"], line["disk_full"], line["corrupt"]
    soak = main.get("soak", {})
    rows = [
        ("SIGKILLs", main.get("kills"), ""),
        ("max rate (msgs/s, mixed)", main.get("max_total_msgs_per_s"), ""),
        ("acknowledged (mqtt/tcp/ws)",
         f"{main.get('mqtt_acked')}/{main.get('tcp_acked')}/{main.get('ws_acked')}", ""),
        ("acknowledged lost", main.get("lost"), "0"),
        ("TCP frames applied twice", main.get("tcp_applied_twice"), "0"),
        ("device replies dropped", main.get("replies_dropped"), "0"),
        ("soak rate (msgs/s)", soak.get("acked_msgs_per_s"), ""),
        ("soak RSS slope (MB/10 min)", soak.get("rss_slope_mb_per_10min"), "< 1"),
        ("disk full: acks in last 5 s full", disk.get("acks_next_5s_full", disk.get("skipped")),
         "0"),
        ("disk full: recovered after (s)", disk.get("recovered_after_s"), ""),
        ("disk full: acknowledged lost", disk.get("lost"), "0"),
        ("corrupt: quarantined", bad.get("quarantined"), "True"),
        ("corrupt: others lost", bad.get("lost"), "0"),
        ("corrupt: others served (msgs)", bad.get("others_served_msgs"), "> 0"),
    ]  # fmt: skip
    out = [f"{'check':<34}{'value':>22}{'target':>10}"]
    out += [f"{name:<34}{value!s:>22}{target:>10}" for name, value, target in rows]
    return "\n".join(out)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    broker = MosquittoBroker(persistence=False, max_inflight_messages=1000,
                             max_queued_messages=10_000_000)  # fmt: skip
    broker.start()
    phases: dict[str, Callable[[argparse.Namespace, MosquittoBroker], Awaitable[Any]]] = {
        "kills_and_soak": run_main,
        "disk_full": run_disk_full,
        "corrupt": run_corrupt,
    }
    line: dict[str, Any] = {"bench": "reliability"}
    try:
        for name, phase in phases.items():
            if name in args.skip.split(","):
                line[name] = {"skipped": "--skip"}
                continue
            log(f"phase {name}")
            try:
                line[name] = await phase(args, broker)
            except Exception as err:  # report the others; this one failed
                log(f"phase {name} failed: {type(err).__name__}: {err}")
                traceback.print_exc()
                line[name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{name}: {json.dumps({k: v for k, v in line[name].items() if k != 'soak'})}")
    finally:
        broker.stop()
    main, disk, bad = line["kills_and_soak"], line["disk_full"], line["corrupt"]
    slope = main.get("soak", {}).get("rss_slope_mb_per_10min")
    line["targets"] = {
        "lost_max": 0, "applied_twice_max": 0, "replies_dropped_max": 0,
        "rss_slope_mb_per_10min_max": TARGET_RSS_SLOPE_MB_PER_10MIN,
        "lost_met": all(p.get("lost") == 0 for p in (main, disk, bad) if "skipped" not in p),
        "applied_twice_met": all(p.get("tcp_applied_twice") == 0 for p in (main, disk, bad)
                                 if "skipped" not in p),
        "replies_dropped_met": main.get("replies_dropped") == 0,
        "rss_slope_met": slope is not None and slope < TARGET_RSS_SLOPE_MB_PER_10MIN,
        "disk_full_stops_acks_met": disk.get("acks_next_5s_full") == 0,
        "disk_full_recovers_met": disk.get("recovered_after_s") is not None,
        "corrupt_quarantined_met": bool(bad.get("quarantined")),
    }  # fmt: skip
    line["config"] = {k: v for k, v in vars(args).items()}
    line["cpus"] = os.cpu_count()
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs under load")
    parser.add_argument("--soak-s", type=float, default=600.0, help="soak at half the max rate")
    parser.add_argument("--rss-every-s", type=float, default=10.0)
    parser.add_argument("--max-s", type=float, default=8.0, help="closed-loop max-rate phase")
    parser.add_argument("--settle-s", type=float, default=60.0, help="catch-up limit at the end")
    parser.add_argument("--corrupt-s", type=float, default=6.0, help="load after the corruption")
    parser.add_argument("--tmpfs-mb", type=int, default=96, help="disk-full state dir size")
    parser.add_argument("--mqtt-devices", type=int, default=20)
    parser.add_argument("--tcp-devices", type=int, default=10)
    parser.add_argument("--ws-clients", type=int, default=4)
    parser.add_argument("--mqtt-window", type=int, default=4)
    parser.add_argument("--tcp-window", type=int, default=4)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--skip", default="", help="comma list: kills_and_soak,disk_full,corrupt")
    args = parser.parse_args()
    line = asyncio.run(bench(args))
    print(table(line))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
