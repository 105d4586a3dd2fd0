"""bench/mqtt.py --real-clients: the MQTT comparison with real C clients, timed from outside.

20 `mosquitto_pub -l -q 1` processes (one per device topic `devices/d{i}/telemetry`) publish
the lines this script writes to their stdin into a private mosquitto; the responder under
test maps each message to a reply on `devices/d{i}/cmd`. Two `mosquitto_sub` watchers
(`-F '%U %t %p'`, the broker's delivery time in ns) timestamp every request and every reply,
so a message's latency is reply time - request time as seen by two ordinary subscribers,
and nothing in the responder's process measures itself. Payloads are unique (`d{i}:{seq}`).

Per responder: a paced phase at half of the echo's saturated rate (p50/p99 of requests sent
in the window; unanswered ones counted), a drain, then a saturated phase (open loop at
`--sat-rate`, above what the responders serve: replies/s counted in the measured window).
The echo runs its saturated phase first, in a pass of its own, to set the half rate.
Responders: the raw aiomqtt echo (bench/mqtt_load.py `baseline`: QoS 0 reply, no state) and
the real gatewayd daemon with the durable TelemetryEcho agent (insert + set_state + QoS 1
reply), at durability `normal` and `full`. Gateway CPU/msg = its utime+stime over the window
/ replies in the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

TICK_S = 0.005
DEVICES = 20


def _realtime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


class Watcher:
    """One `mosquitto_sub` recording the first delivery time (ns, realtime) of each payload."""

    def __init__(self, port: int, topic: str) -> None:
        self.port = port
        self.topic = topic
        self.seen: dict[bytes, int] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            "stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), "-t", self.topic,
            "-q", "0", "-d", "-F", "%U %t %p",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        subscribed = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(subscribed))
        await asyncio.wait_for(subscribed, 10)

    async def _read(self, subscribed: asyncio.Future[None]) -> None:
        assert self._process is not None and self._process.stdout is not None
        seen = self.seen
        async for line in self._process.stdout:
            if line[:1].isdigit():
                stamp, _topic, payload = line.rstrip(b"\n").split(b" ", 2)
                if payload not in seen:
                    seconds, _, fraction = stamp.partition(b".")
                    seen[payload] = int(seconds) * 1_000_000_000 + int(fraction.ljust(9, b"0"))
            elif b"SUBACK" in line and not subscribed.done():
                subscribed.set_result(None)

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class Publishers:
    """`DEVICES` `mosquitto_pub -l -q 1` processes; `offer()` writes their lines, paced."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.processes: list[asyncio.subprocess.Process] = []
        self.seq = 0

    async def start(self) -> None:
        for device in range(DEVICES):
            command = (
                "mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-q", "1", "-l",
                "-t", f"devices/d{device}/telemetry", "-i", f"bench-pub-{os.getpid()}-{device}",
            )  # fmt: skip
            self.processes.append(
                await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )

    async def offer(self, rate_per_s: float, seconds: float) -> None:
        """Open loop: `rate_per_s` messages over all devices, in TICK_S ticks, round robin."""
        began = time.monotonic()
        due = 0
        device = 0
        while (now := time.monotonic()) - began < seconds:
            target = int((now - began) * rate_per_s)
            lines: list[list[bytes]] = [[] for _ in range(DEVICES)]
            while due < target:
                self.seq += 1
                lines[device].append(b"d%d:%d\n" % (device, self.seq))
                device = (device + 1) % DEVICES
                due += 1
            for process, chunk in zip(self.processes, lines, strict=True):
                if chunk:
                    assert process.stdin is not None
                    process.stdin.write(b"".join(chunk))
            await asyncio.gather(*(p.stdin.drain() for p in self.processes if p.stdin))
            await asyncio.sleep(TICK_S)

    async def stop(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.processes.clear()


def _window_stats(
    requests: dict[bytes, int], replies: dict[bytes, int], start_ns: int, end_ns: int
) -> dict[str, Any]:
    window_s = (end_ns - start_ns) / 1e9
    replied = sum(1 for t in replies.values() if start_ns <= t < end_ns)
    latencies = sorted(
        replies[p] - t for p, t in requests.items() if start_ns <= t < end_ns and p in replies
    )
    asked = sum(1 for t in requests.values() if start_ns <= t < end_ns)

    def q(fraction: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] / 1e6, 2)

    return {
        "replies_per_s": round(replied / window_s, 1),
        "requests_per_s": round(asked / window_s, 1),
        "unanswered": asked - len(latencies),
        "p50_ms": q(0.50),
        "p99_ms": q(0.99),
    }


async def measure(
    port: int,
    pid: int,
    cpu_s: Callable[[int], float],
    *,
    sat_rate: float,
    half_rate: float | None,
    warmup_s: float,
    duration_s: float,
    drain_s: float,
) -> dict[str, Any]:
    """The paced phase (if `half_rate`), then the saturated one (if `sat_rate`), each followed
    by a drain, against one responder."""
    requests = Watcher(port, "devices/+/telemetry")
    replies = Watcher(port, "devices/+/cmd")
    await requests.start()
    await replies.start()
    publishers = Publishers(port)
    await publishers.start()
    result: dict[str, Any] = {}
    try:
        # The paced phase first: a saturated phase leaves a backlog in the broker that a slow
        # responder may not have served by the end of the drain.
        for phase, rate in (("half", half_rate), ("saturated", sat_rate)):
            if not rate:
                continue
            offering = asyncio.create_task(publishers.offer(rate, warmup_s + duration_s))
            await asyncio.sleep(warmup_s)
            start_ns, cpu_before = _realtime_ns(), cpu_s(pid)
            await offering
            end_ns, cpu_after = _realtime_ns(), cpu_s(pid)
            # Drain: wait until the replies stop growing (backlog served), bounded.
            deadline = time.monotonic() + drain_s
            last = -1
            while time.monotonic() < deadline and len(replies.seen) != last:
                last = len(replies.seen)
                await asyncio.sleep(0.5)
            stats = _window_stats(requests.seen, replies.seen, start_ns, end_ns)
            served = stats["replies_per_s"] * (end_ns - start_ns) / 1e9
            stats["offered_per_s"] = round(rate, 1)
            stats["server_cpu_us_per_msg"] = (
                round((cpu_after - cpu_before) * 1e6 / served, 1) if served else None
            )
            stats["server_cpu_util"] = round(
                (cpu_after - cpu_before) * 1e9 / (end_ns - start_ns), 3
            )
            result[phase] = stats
    finally:
        await publishers.stop()
        await requests.stop()
        await replies.stop()
    return result


async def run_real_clients(
    responders: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]]],
    pid_of: Callable[[Any], int],
    cpu_s: Callable[[int], float],
    port: int,
    *,
    repeats: int,
    sat_rate: float,
    warmup_s: float,
    duration_s: float,
    drain_s: float,
) -> dict[str, Any]:
    """Interleaved repeats over `responders` (the first is the echo baseline, whose saturated
    rate sets every responder's half rate in that repeat); medians per responder."""
    if shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None:
        raise SystemExit("--real-clients needs mosquitto_pub and mosquitto_sub (mosquitto-clients)")
    runs: list[dict[str, Any]] = []
    for repeat in range(repeats):
        run: dict[str, Any] = {}
        half_rate: float | None = None
        order = list(responders.items())
        if repeat % 2:  # the echo first (it sets the half rate), the others reversed
            order = order[:1] + order[:0:-1]
        for name, (start, stop) in order:
            server = await start()
            try:
                # The echo's own half rate needs its saturated rate first: two passes for it.
                result = await measure(
                    port, pid_of(server), cpu_s, sat_rate=sat_rate, half_rate=half_rate,
                    warmup_s=warmup_s, duration_s=duration_s, drain_s=drain_s,
                )  # fmt: skip
                if half_rate is None:
                    half_rate = 0.5 * result["saturated"]["replies_per_s"]
                    half = await measure(
                        port, pid_of(server), cpu_s, sat_rate=0, half_rate=half_rate,
                        warmup_s=warmup_s, duration_s=duration_s, drain_s=drain_s,
                    )  # fmt: skip
                    result["half"] = half["half"]
            finally:
                await stop(server)
            run[name] = result
            sat, half = result["saturated"], result.get("half", {})
            print(
                f"  [{repeat + 1}/{repeats}] {name}: saturated {sat['replies_per_s']} replies/s "
                f"({sat['server_cpu_us_per_msg']} us/msg); at {half.get('offered_per_s')}/s "
                f"p50 {half.get('p50_ms')} p99 {half.get('p99_ms')} ms, "
                f"unanswered {half.get('unanswered')}",
                flush=True,
            )
        runs.append(run)
    medians: dict[str, Any] = {}
    for name in responders:
        medians[name] = {}
        for phase in ("saturated", "half"):
            keys = [k for k in runs[0][name].get(phase, {})]
            medians[name][phase] = {
                k: _median([r[name].get(phase, {}).get(k) for r in runs]) for k in keys
            }
    return {"median": medians, "runs": runs}


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None
