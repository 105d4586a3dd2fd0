"""Paced (open-loop) TCP frame senders, one process of many: bench/tcp.py starts several.

Every connection sends one DATA frame every `interval_s` = devices / rate seconds, at fixed
times (t0 + phase + k * interval), whatever the gateway does: the offered load does not back
off when ACKs are late, so queueing in the gateway shows as latency, not as a lower rate. The
phases spread the devices evenly over one interval across ALL sender processes (device i of n
starts at i / n of the interval; process p of P has devices p, p + P, ...), so the gateway sees a steady stream, not bursts. A device
with `window` frames unACKed skips its slot (counted: the offered rate was then not met).

Protocol with the parent (bench/tcp.py), one line each:
    child  -> parent   READY                      (every device got HELLO_OK)
    parent -> child    GO <t0> <warmup_s> <duration_s>   (t0: time.monotonic(), shared)
    child  -> parent   DONE                       (--result-file holds the JSON: latencies in
                                                   µs of the measured window, next free seq,
                                                   counters)
Connections are asyncio.Protocol objects on uvloop when available (~25 µs of CPU per frame
with its ACK). bench/tcp_paced_sender.c does the same job with the same arguments and
protocol at a fraction of that (`start_senders(sender="c")`, compiled on first use): on a
2-core box the Python senders at 50% of the gateway's max rate take most of the core the
gateway would need.

    python bench/tcp_paced.py --port P --first-device 0 --stride 4 --total-devices 1000 \
        --rate 15000 --first-seq 66 --window 8
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocols.frames import (  # noqa: E402
    Ack,
    Close,
    Data,
    Error,
    FrameDecoder,
    FrameType,
    Hello,
    HelloOk,
    Ping,
    Pong,
    Push,
    encode,
)


class PacedDevice(asyncio.Protocol):
    """One device connection: sends when told, matches ACKs to send times."""

    def __init__(self, device_id: str, secret: str, window: int) -> None:
        self.device_id, self.secret, self.window = device_id, secret, window
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.hello_ok: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent_at: dict[int, float] = {}
        self.next_seq = 1
        # Frames SENT in [measure_from, measure_to) count, whenever their ACK comes.
        self.measure_from = self.measure_to = 0.0
        self.latencies_us: list[int] = []
        self.errors: list[str] = []
        self.drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(encode(Hello(self.device_id, self.secret, "bench/tcp_paced")))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        for frame in self.decoder.feed(data):
            if frame.TYPE is FrameType.ACK:
                assert isinstance(frame, Ack)
                sent = self.sent_at.pop(frame.seq, None)
                if sent is not None and self.measure_from <= sent < self.measure_to:
                    self.latencies_us.append(round((now - sent) * 1e6))
                if self.drained is not None and not self.sent_at and not self.drained.done():
                    self.drained.set_result(None)
            elif isinstance(frame, HelloOk):
                self.window = min(self.window, frame.max_unacked)
                if not self.hello_ok.done():
                    self.hello_ok.set_result(None)
            elif isinstance(frame, Push):  # an agent's reply: acknowledge it
                assert self.transport is not None
                self.transport.write(encode(Ack(frame.seq)))
            elif isinstance(frame, Ping):
                assert self.transport is not None
                self.transport.write(encode(Pong(frame.seq)))
            elif isinstance(frame, Error | Close):
                self.errors.append(repr(frame))
                if not self.hello_ok.done():
                    self.hello_ok.set_exception(ConnectionError(repr(frame)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.hello_ok.done():
            self.hello_ok.set_exception(ConnectionError(f"{self.device_id}: closed ({exc})"))
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def send(self, payload: bytes) -> bool:
        if len(self.sent_at) >= self.window or self.transport is None:
            return False
        seq = self.next_seq
        self.next_seq = seq + 1
        self.sent_at[seq] = time.monotonic()
        self.transport.write(encode(Data(seq, payload)))
        return True


def next_free_seq(first_seq: int, interval_s: float, pass_s: float) -> int:
    """The first seq after a pass: above any seq a device can send in `pass_s`."""
    return first_seq + int(pass_s / interval_s) + 2


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    indices = range(args.first_device, args.total_devices, args.stride)
    conns: list[PacedDevice] = []
    for i in indices:
        _, device = await loop.create_connection(
            lambda i=i: PacedDevice(f"bench-{i:05d}", f"secret-{i:05d}", args.window),
            args.host,
            args.port,
        )
        device.next_seq = args.first_seq
        conns.append(device)
    await asyncio.gather(*(c.hello_ok for c in conns))
    print("READY", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    _, t0_s, warmup_s, duration_s = line.split()
    t0, warmup, duration = float(t0_s), float(warmup_s), float(duration_s)
    payload = os.urandom(args.payload_bytes)
    interval = args.total_devices / args.rate
    # Device i of the fleet sends at t0 + (i / total + j) * interval, j = 0, 1, ...: in this
    # process that is a fixed rotation over `conns` (their i are increasing).
    offsets = [(i / args.total_devices) * interval for i in indices]
    measure_from, measure_to = t0 + warmup, t0 + warmup + duration
    for device in conns:
        device.measure_from, device.measure_to = measure_from, measure_to
    sent = skipped = late = 0  # late: sent over 1 ms after its slot (this process was busy)
    k, cycle_at = 0, t0
    while True:
        now = time.monotonic()
        if now >= measure_to:
            break
        counting = now >= measure_from
        while (at := cycle_at + offsets[k]) <= now:
            device = conns[k]
            if device.send(payload):
                sent += counting
                late += counting and now - at > 0.001
            else:
                skipped += counting
            k += 1
            if k == len(conns):
                k, cycle_at = 0, cycle_at + interval
        await asyncio.sleep(max(0.0, min(at, measure_to) - time.monotonic()))
    # Seqs must stay contiguous per device and equal across devices for the next pass: bring
    # every device (in every process: the bound is the same) to the same next seq, then wait
    # for every ACK.
    top = next_free_seq(args.first_seq, interval, warmup + duration)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(c.sent_at or c.next_seq < top for c in conns):
        for c in conns:
            while c.next_seq < top and c.send(payload):
                pass
        await asyncio.sleep(0.005)
    errors = [e for c in conns for e in c.errors]
    unacked = sum(len(c.sent_at) for c in conns)
    if unacked:
        errors.append(f"{unacked} frames still unacked 60 s after the paced pass")
    for c in conns:
        if c.transport is not None:
            c.transport.write(encode(Close(1000, "bench done")))
            c.transport.close()
    return {
        "sent": sent,
        "skipped_window_full": skipped,
        "sent_late": late,
        "latencies_us": [x for c in conns for x in c.latencies_us],
        "next_seq": top,
        "errors": errors[:5],
        "error_count": len(errors),
    }


C_SENDER_SOURCE = Path(__file__).with_name("tcp_paced_sender.c")
SENDERS = ("c", "python")


def default_sender() -> str:
    """ "c" (bench/tcp_paced_sender.c, ~10x less CPU per frame) where gcc is installed."""
    return "c" if shutil.which("gcc") else "python"


def c_sender_binary() -> Path:
    """bench/tcp_paced_sender.c compiled (gcc -O2), cached by the source's hash."""
    source = C_SENDER_SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gatewayd-bench"
    binary = cache / f"tcp_paced_sender-{hashlib.sha256(source).hexdigest()[:16]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        building = binary.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(building), str(C_SENDER_SOURCE)], check=True
        )
        building.replace(binary)
    return binary


def start_senders(
    port: int, senders: int, total_devices: int, *, rate: float, first_seq: int, window: int,
    payload_bytes: int, result_dir: str, env: dict[str, str] | None = None,
    sender: str = "python",
) -> list[subprocess.Popen[str]]:  # fmt: skip
    """Start `senders` processes of this script (`sender` "python") or of the C sender ("c")
    sharing `total_devices` (process p has devices p, p + senders, ...); each writes its JSON
    to `result_dir`/sender-<p>.json. The caller reads READY, writes GO and waits for DONE (see
    the module docstring)."""
    if sender not in SENDERS:
        raise ValueError(f"sender must be one of {SENDERS}, not {sender!r}")
    program = [str(c_sender_binary())] if sender == "c" else [sys.executable, __file__]
    processes = []
    for p in range(senders):
        argv = [
            *program, "--port", str(port), "--first-device", str(p),
            "--stride", str(senders), "--total-devices", str(total_devices), "--rate", str(rate),
            "--first-seq", str(first_seq), "--window", str(window),
            "--payload-bytes", str(payload_bytes),
            "--result-file", str(Path(result_dir) / f"sender-{p}.json"),
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
        )
    return processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-device", type=int, required=True)
    parser.add_argument("--stride", type=int, required=True, help="this process: every Nth")
    parser.add_argument("--total-devices", type=int, required=True, help="in all processes")
    parser.add_argument("--rate", type=float, required=True, help="frames/s of ALL processes")
    parser.add_argument("--first-seq", type=int, required=True)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--result-file", required=True, help="where the result JSON goes")
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    Path(args.result_file).write_text(json.dumps(result))
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
