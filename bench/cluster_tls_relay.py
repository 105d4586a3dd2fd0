"""What relaying a TLS device over TLS costs, against relaying it in plaintext: the relaying
member's hop to the owner (`gatewayd.cluster.forward.TcpRelay`) with and without TLS.

Real sockets on loopback, one process (one event loop, as a member runs): an echo server
stands in for the owner's TCP listener (plain, or TLS with a self-signed EC P-256 certificate
made by openssl), and a device connects to a relay in front of it. Two measures, each a
median over interleaved repeats (plain, tls, plain, ...):

- connect: the device connects and gets its first bytes back (what a reconnecting device
  waits for: the relay's connection to the owner, with its handshake when over TLS);
- round trip: one 64-byte frame there and back over an open relay.

The device's own leg is plain in both (a TLS device's leg costs the same either way), so the
difference is the relay's hop alone.

    python bench/cluster_tls_relay.py            # a few seconds
    python bench/cluster_tls_relay.py --connects 400 --round-trips 4000

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gatewayd.cluster.forward import TcpRelay
from gatewayd.eventloop import loop_name, run

FIRST = b"h" * 40  # about a HELLO
FRAME = b"d" * 64


def _certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "owner.pem", directory / "owner.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


_ECHOING: set[asyncio.Task[Any]] = set()  # the echo handlers still serving a connection


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    task = asyncio.current_task()
    assert task is not None
    _ECHOING.add(task)
    try:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()
    finally:
        _ECHOING.discard(task)


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> None:
    await reader.readexactly(size)


async def _connect_once(port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _read_exactly(reader, len(FIRST))
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def _round_trips(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _read_exactly(reader, len(FIRST))
    times = []
    for _ in range(count):
        started = time.perf_counter()
        writer.write(FRAME)
        await _read_exactly(reader, len(FRAME))
        times.append(time.perf_counter() - started)
    writer.close()
    return times


async def _relay(owner_port: int, tls: ssl.SSLContext | None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    factory: Callable[[], TcpRelay] = lambda: TcpRelay(  # noqa: E731
        "127.0.0.1", owner_port, FIRST, b"BUSY", tls=tls
    )
    return await loop.create_server(factory, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def main(connects: int, round_trips: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        cert, key = _certificate(Path(scratch))
        owner_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        owner_tls.load_cert_chain(cert, key)
        trust = ssl.create_default_context(cafile=str(cert))
    owners = {
        "plain": await asyncio.start_server(_echo, "127.0.0.1", 0),
        "tls": await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=owner_tls),
    }
    relays = {
        "plain": await _relay(_port(owners["plain"]), None),
        "tls": await _relay(_port(owners["tls"]), trust),
    }
    connect_s: dict[str, list[float]] = {"plain": [], "tls": []}
    trip_s: dict[str, list[float]] = {"plain": [], "tls": []}
    try:
        for _ in range(repeats):
            for kind in ("plain", "tls"):  # interleaved
                port = _port(relays[kind])
                connect_s[kind] += [await _connect_once(port) for _ in range(connects // repeats)]
                trip_s[kind] += await _round_trips(port, round_trips // repeats)
    finally:
        for server in (*owners.values(), *relays.values()):
            server.close()
        if _ECHOING:  # the devices' closes reach the owner through the relays
            await asyncio.wait(set(_ECHOING), timeout=5)
    result: dict[str, Any] = {"bench": "cluster_tls_relay", "loop": loop_name()}
    for kind in ("plain", "tls"):
        result[f"{kind}_connect_ms_p50"] = round(statistics.median(connect_s[kind]) * 1e3, 3)
        result[f"{kind}_round_trip_us_p50"] = round(statistics.median(trip_s[kind]) * 1e6, 1)
    result["tls_connect_ratio"] = round(
        result["tls_connect_ms_p50"] / result["plain_connect_ms_p50"], 2
    )
    result["tls_round_trip_ratio"] = round(
        result["tls_round_trip_us_p50"] / result["plain_round_trip_us_p50"], 2
    )
    result["connects"], result["round_trips"] = connects, round_trips
    result["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"{'relay hop':<10} {'connect p50 (ms)':>17} {'round trip p50 (us)':>20}")
    for kind in ("plain", "tls"):
        print(
            f"{kind:<10} {result[f'{kind}_connect_ms_p50']:>17} "
            f"{result[f'{kind}_round_trip_us_p50']:>20}"
        )
    print(
        f"tls/plain: connect {result['tls_connect_ratio']}x, round trip "
        f"{result['tls_round_trip_ratio']}x (load average {result['load_avg']})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _print(run(main(args.connects, args.round_trips, args.repeats)))
