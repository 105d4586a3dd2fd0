"""TCP binary-frame load generator: N simulated devices connect, send HELLO, stream DATA frames
with sequence numbers (pipelined up to the window) and wait for every ACK.

Reports acked frames/s, p50/p99 ACK latency (send -> ACK, seen by the device) and the load
generator's OWN encode/decode cost per frame, so the figure says how much of the time was spent
simulating devices rather than in the gateway.

Without --connect it starts the gateway side itself, in a child process, twice per repeat:
  baseline  `null`:   TcpListener + a handler that resolves every future at once
                      (transport + codec only: the ceiling for this machine);
  candidate `sqlite`: TcpListener + a handler that commits each DATA frame to a per-device SQLite
                      file with a last-seq table (WAL, synchronous=NORMAL) before resolving,
                      i.e. the agent runtime's durable path without the runtime itself
                      (`sqlite-group`, used by bench/tcp.py: the same with one transaction per
                      device file per loop iteration, as the runtime batches).
With --connect HOST:PORT it also measures that running gateway (devices and secrets from
--secrets-file; use --first-seq above what the gateway has applied, or every frame is a
DUPLICATE), side by side with the in-process null baseline.

Prints a table, then one JSON line (medians over --repeats).
Usage: python bench/tcp_load.py [--devices 50] [--frames 200] [--window 16] [--payload-bytes 64]
                                [--repeats 3] [--connect HOST:PORT --secrets-file devices.toml]
As a library: `await run_load(host, port, [(device_id, secret), ...], frames_per_device=...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    Hello,
    HelloOk,
    Ping,
    Pong,
    Push,
    encode,
)


@dataclass
class LoadResult:
    devices: int
    frames_acked: int
    elapsed_s: float
    ack_latencies_s: list[float] = field(repr=False)
    encode_ns: int
    decode_ns: int
    frames_encoded: int
    errors: list[str]

    @property
    def frames_per_s(self) -> float:
        return self.frames_acked / self.elapsed_s if self.elapsed_s else 0.0

    def latency_ms(self, quantile: float) -> float:
        if not self.ack_latencies_s:
            return float("nan")
        ordered = sorted(self.ack_latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    @property
    def encode_us_per_frame(self) -> float:
        return self.encode_ns / 1000 / max(1, self.frames_encoded)

    @property
    def decode_us_per_frame(self) -> float:
        return self.decode_ns / 1000 / max(1, self.frames_acked)

    def summary(self) -> dict[str, Any]:
        return {
            "frames_acked": self.frames_acked,
            "frames_per_s": round(self.frames_per_s, 1),
            "ack_p50_ms": round(self.latency_ms(0.50), 3),
            "ack_p99_ms": round(self.latency_ms(0.99), 3),
            "client_encode_us_per_frame": round(self.encode_us_per_frame, 3),
            "client_decode_us_per_frame": round(self.decode_us_per_frame, 3),
            "errors": len(self.errors),
        }


class _DeviceTally:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.encode_ns = 0
        self.decode_ns = 0
        self.encoded = 0
        self.errors: list[str] = []


async def _run_device(
    host: str,
    port: int,
    device_id: str,
    secret: str,
    *,
    frames: int,
    window: int,
    payload: bytes,
    first_seq: int,
    start: asyncio.Event,
    tally: _DeviceTally,
    ssl: Any = None,
) -> None:
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
    decoder = FrameDecoder()
    try:
        writer.write(encode(Hello(device_id, secret, "bench/tcp_load")))
        hello_ok = None
        while hello_ok is None:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError(f"{device_id}: closed before HELLO_OK")
            for frame in decoder.feed(data):
                if isinstance(frame, HelloOk):
                    hello_ok = frame
                elif isinstance(frame, Error):
                    raise ConnectionError(f"{device_id}: {frame.code} {frame.message}")
        window = min(window, hello_ok.max_unacked)
        await start.wait()
        sent_at: dict[int, float] = {}
        next_seq, last_seq = first_seq, first_seq + frames - 1
        acked = 0
        clock = time.perf_counter
        clock_ns = time.perf_counter_ns
        while acked < frames:
            if next_seq <= last_seq and len(sent_at) < window:
                batch = []
                began = clock_ns()
                while next_seq <= last_seq and len(sent_at) + len(batch) < window:
                    batch.append(encode(Data(next_seq, payload)))
                    next_seq += 1
                tally.encode_ns += clock_ns() - began
                tally.encoded += len(batch)
                now = clock()
                for seq in range(next_seq - len(batch), next_seq):
                    sent_at[seq] = now
                writer.write(b"".join(batch))
            data = await reader.read(65536)
            if not data:
                raise ConnectionError(
                    f"{device_id}: connection closed with {frames - acked} unacked"
                )
            began = clock_ns()
            received = decoder.feed(data)
            tally.decode_ns += clock_ns() - began
            now = clock()
            for frame in received:
                if isinstance(frame, Ack):
                    sent = sent_at.pop(frame.seq, None)
                    if sent is not None:
                        tally.latencies_s.append(now - sent)
                        acked += 1
                elif isinstance(frame, Push):  # an agent's reply: acknowledge it
                    writer.write(encode(Ack(frame.seq)))
                elif isinstance(frame, Ping):
                    writer.write(encode(Pong(frame.seq)))
                elif isinstance(frame, Error | Close):
                    raise ConnectionError(f"{device_id}: {frame!r}")
        writer.write(encode(Close(1000, "bench done")))
    except (OSError, ConnectionError) as exc:
        tally.errors.append(str(exc))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_load(
    host: str,
    port: int,
    devices: Sequence[tuple[str, str]],
    *,
    frames_per_device: int = 200,
    window: int = 16,
    payload_bytes: int = 64,
    first_seq: int = 1,
    ssl: Any = None,
) -> LoadResult:
    """Connect every device, then start all streams together; returns when all are done."""
    start = asyncio.Event()
    tallies = [_DeviceTally() for _ in devices]
    payload = os.urandom(payload_bytes)
    tasks = [
        asyncio.create_task(
            _run_device(
                host,
                port,
                device_id,
                secret,
                frames=frames_per_device,
                window=window,
                payload=payload,
                first_seq=first_seq,
                start=start,
                tally=tally,
                ssl=ssl,
            )
        )
        for (device_id, secret), tally in zip(devices, tallies, strict=True)
    ]
    await asyncio.sleep(0.2)  # let every device connect and authenticate first
    began = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    elapsed_s = time.perf_counter() - began
    return LoadResult(
        devices=len(devices),
        frames_acked=sum(len(t.latencies_s) for t in tallies),
        elapsed_s=elapsed_s,
        ack_latencies_s=[x for t in tallies for x in t.latencies_s],
        encode_ns=sum(t.encode_ns for t in tallies),
        decode_ns=sum(t.decode_ns for t in tallies),
        frames_encoded=sum(t.encoded for t in tallies),
        errors=[e for t in tallies for e in t.errors],
    )


# ---------------------------------------------------------------- gateway side (child process)


def _bench_devices(count: int) -> list[tuple[str, str]]:
    return [(f"bench-{i:05d}", f"secret-{i:05d}") for i in range(count)]


class _NullHandler:
    """Resolves every event at once: measures transport + codec only.

    The loop is looked up once: `asyncio.get_running_loop()` makes a `getpid()` syscall per
    call (CPython 3.11 checks for a fork), one per frame that the gateway's runtime (which
    keeps its loop) does not pay."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _done(self) -> asyncio.Future:
        from protocols.link import Outcome

        future = self._running_loop().create_future()
        future.set_result(Outcome.APPLIED)
        return future

    def open_link(self, link: Any, context: dict[str, Any]) -> asyncio.Future:
        return self._done()

    def submit_message(self, link: Any, data: Any, dedup: Any = None) -> asyncio.Future:
        return self._done()

    def close_link(self, link: Any, code: int, reason: str) -> asyncio.Future:
        return self._done()


class _SqliteHandler(_NullHandler):
    """Commits each DATA frame (row + last-seq update, one transaction) before resolving."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._databases: dict[str, sqlite3.Connection] = {}

    def _database(self, device_id: str) -> sqlite3.Connection:
        db = self._databases.get(device_id)
        if db is None:
            db = sqlite3.connect(self._state_dir / f"{device_id}.sqlite3", isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS inbox (seq INTEGER PRIMARY KEY, payload BLOB)")
            db.execute("CREATE TABLE IF NOT EXISTS last_seq (id INTEGER PRIMARY KEY, seq INTEGER)")
            self._databases[device_id] = db
        return db

    def submit_message(self, link: Any, data: Any, dedup: Any = None) -> asyncio.Future:
        from protocols.link import Outcome

        db = self._database(dedup.stream)
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT seq FROM last_seq WHERE id = 1").fetchone()
        if row is not None and dedup.seq <= row[0]:
            db.execute("ROLLBACK")
            outcome = Outcome.DUPLICATE
        else:
            db.execute("INSERT INTO inbox VALUES (?, ?)", (dedup.seq, data))
            db.execute("INSERT OR REPLACE INTO last_seq VALUES (1, ?)", (dedup.seq,))
            db.execute("COMMIT")
            outcome = Outcome.APPLIED
        future = self._running_loop().create_future()
        future.set_result(outcome)
        return future


class _GroupSqliteHandler(_SqliteHandler):
    """`sqlite` with group commit: the frames a device's file gets in one loop iteration share
    one transaction, committed at the end of the iteration (one COMMIT for all of them), and
    only then resolved. The best a bare per-device-file server does without the runtime."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        # device -> (its connection, last applied seq, [(future, outcome)])
        self._open: dict[str, tuple[sqlite3.Connection, list[int], list[Any]]] = {}

    def submit_message(self, link: Any, data: Any, dedup: Any = None) -> asyncio.Future:
        from protocols.link import Outcome

        loop = self._running_loop()
        entry = self._open.get(dedup.stream)
        if entry is None:
            db = self._database(dedup.stream)
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT seq FROM last_seq WHERE id = 1").fetchone()
            if not self._open:
                loop.call_soon(self._commit_all)
            entry = self._open[dedup.stream] = (db, [row[0] if row else 0], [])
        db, last, settled = entry
        future = loop.create_future()
        if dedup.seq <= last[0]:
            settled.append((future, Outcome.DUPLICATE))
        else:
            db.execute("INSERT INTO inbox VALUES (?, ?)", (dedup.seq, data))
            last[0] = dedup.seq
            settled.append((future, Outcome.APPLIED))
        return future

    def _commit_all(self) -> None:
        entries, self._open = self._open, {}
        for db, last, settled in entries.values():
            db.execute("INSERT OR REPLACE INTO last_seq VALUES (1, ?)", (last[0],))
            db.execute("COMMIT")
            for future, outcome in settled:
                future.set_result(outcome)


class _RawEcho(asyncio.Protocol):
    """The `raw` baseline: a bare asyncio server that ACKs every DATA at once, with the frame
    codec but nothing else (no session rules, no auth, no handler, no state)."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        out = []
        for frame in self.decoder.feed(data):
            if isinstance(frame, Data):
                out.append(encode(Ack(frame.seq)))
            elif isinstance(frame, Hello):
                out.append(encode(HelloOk(1 << 20, 256, 30_000, 1)))
            elif isinstance(frame, Ping):
                out.append(encode(Pong(frame.seq)))
            elif isinstance(frame, Close):
                out.append(encode(Close(1000, "")))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def _serve_raw(device_count: int) -> None:
    loop = asyncio.get_running_loop()
    # The listen backlog TcpListener uses (its max_connections, as for `null` below).
    server = await loop.create_server(_RawEcho, "127.0.0.1", 0, backlog=device_count + 16)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    server.close()


async def _serve(kind: str, device_count: int, state_dir: Path) -> None:
    from protocols.tcp import TcpListener, TcpSettings

    if kind == "raw":
        await _serve_raw(device_count)
        return
    handlers = {"null": _NullHandler, "sqlite": _SqliteHandler, "sqlite-group": _GroupSqliteHandler}
    handler = handlers[kind]() if kind == "null" else handlers[kind](state_dir)
    settings = TcpSettings(
        host="127.0.0.1",
        port=0,
        agent_class="bench",
        secrets=dict(_bench_devices(device_count)),
        max_connections=device_count + 16,
        max_unacked_window=256,
    )
    listener = TcpListener(settings, handler)  # type: ignore[arg-type]
    await listener.start()
    print(f"PORT {listener.bound_port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    await listener.stop(drain_timeout_s=1.0)


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _measure_child(kind: str, args: argparse.Namespace) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="tcp-load-") as state_dir:
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                kind,
                "--devices",
                str(args.devices),
                "--state-dir",
                state_dir,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.startswith("PORT "):
                raise SystemExit(f"gateway child ({kind}) did not start: {line!r}")
            port = int(line.split()[1])
            return _run(
                run_load(
                    "127.0.0.1",
                    port,
                    _bench_devices(args.devices),
                    frames_per_device=args.frames,
                    window=args.window,
                    payload_bytes=args.payload_bytes,
                )
            )
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=30)


def _load_devices_file(path: str) -> list[tuple[str, str]]:
    from protocols.tcp import load_secrets_file

    return sorted(load_secrets_file(path).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--frames", type=int, default=200, help="DATA frames per device")
    parser.add_argument("--window", type=int, default=16, help="unacked frames per device")
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connect", metavar="HOST:PORT", help="also load a running gateway")
    parser.add_argument("--secrets-file", help="devices for --connect (device-id = secret)")
    parser.add_argument("--first-seq", type=int, default=1, help="first DATA seq (--connect)")
    parser.add_argument(
        "--serve", choices=["raw", "null", "sqlite", "sqlite-group"], help=argparse.SUPPRESS
    )
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        _run(_serve(args.serve, args.devices, Path(args.state_dir)))
        return

    kinds = ["null", "sqlite"] + (["target"] if args.connect else [])
    results: dict[str, list[LoadResult]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            if kind == "target":
                host, _, port = args.connect.rpartition(":")
                if not args.secrets_file:
                    raise SystemExit("--connect needs --secrets-file")
                result = _run(
                    run_load(
                        host,
                        int(port),
                        _load_devices_file(args.secrets_file)[: args.devices],
                        frames_per_device=args.frames,
                        window=args.window,
                        payload_bytes=args.payload_bytes,
                        first_seq=args.first_seq,
                    )
                )
            else:
                result = _measure_child(kind, args)
            results[kind].append(result)

    medians: dict[str, dict[str, float]] = {}
    print(
        f"{'gateway side':<12}{'frames/s':>12}{'ack p50 ms':>12}{'ack p99 ms':>12}"
        f"{'enc us/fr':>11}{'dec us/fr':>11}{'errors':>8}"
    )
    for kind, runs in results.items():
        summaries = [r.summary() for r in runs]
        medians[kind] = {key: statistics.median(s[key] for s in summaries) for key in summaries[0]}
        m = medians[kind]
        label = {"null": "null (base)", "sqlite": "sqlite", "target": args.connect}[kind]
        print(
            f"{label:<12}{m['frames_per_s']:>12.0f}{m['ack_p50_ms']:>12.2f}{m['ack_p99_ms']:>12.2f}"
            f"{m['client_encode_us_per_frame']:>11.2f}{m['client_decode_us_per_frame']:>11.2f}"
            f"{m['errors']:>8.0f}"
        )
        for run in runs:
            for error in run.errors[:3]:
                print(f"  error ({kind}): {error}")
    base = medians["null"]["frames_per_s"]
    output: dict[str, Any] = {
        "bench": "tcp_load",
        "devices": args.devices,
        "frames_per_device": args.frames,
        "window": args.window,
        "payload_bytes": args.payload_bytes,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "median": medians,
        "ratio_frames_per_s_vs_null": {
            kind: round(m["frames_per_s"] / base, 3) if base else None
            for kind, m in medians.items()
        },
    }
    print(json.dumps(output))


if __name__ == "__main__":
    main()
