"""Backpressure from the device's side: a device that does not take its pushes (does not ACK
them, or stops reading its socket) stops being read for DATA, instead of the gateway growing
its push backlog or send buffer; everything flows again, exactly once and in order, once it
catches up. Real sockets, a real SQLite-committing handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocols.frames import Ack, Data, Ping, Pong, Push
from protocols.link import DedupKey, Link, Outcome
from protocols.tcp import TcpListener, TcpSettings
from tests.protocols.test_tcp import (
    SECRETS,
    SqliteLinkHandler,
    connect_device,
    connect_slow_reader,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class PushingHandler(SqliteLinkHandler):
    """Commits each DATA frame, then pushes `reply` to the device (like an agent answering
    every reading)."""

    reply = b"ok"

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        applied = super().submit_message(link, data, dedup)
        applied.add_done_callback(lambda f: f.exception() is None and link.send(self.reply))
        return applied


@pytest.fixture
async def handler(tmp_path: Path) -> AsyncIterator[PushingHandler]:
    handler = PushingHandler(tmp_path / "agents.sqlite3")
    yield handler
    await handler.aclose()


async def start(handler: PushingHandler, **overrides: object) -> TcpListener:
    options: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "agent_class": "thermostat",
        "secrets": SECRETS,
        **overrides,
    }
    listener = TcpListener(TcpSettings(**options), handler)  # type: ignore[arg-type]
    await listener.start()
    return listener


async def test_a_device_that_does_not_ack_pushes_is_not_read_for_data_until_it_does(
    handler: PushingHandler,
) -> None:
    listener = await start(handler, max_pending_pushes=4, max_push_backlog=8)
    try:
        device = await connect_device(listener.bound_port)
        for seq in range(1, 9):  # each applied frame makes the agent push once
            device.send(Data(seq, b"r%d" % seq))
            frames = []
            while Ack(seq) not in frames:
                frames.append(await device.recv())
        await wait_until(lambda: listener.push_backlog("dev-a") == 8, 5, "8 pushes owed")
        assert listener.stats.extra["push_backlog_holds"] == 1

        # Over the backlog: more DATA is read (to see the PING behind it) but not accepted.
        device.send(Data(9, b"r9"), Data(10, b"r10"), Ping(1))
        while (frame := await device.recv()) != Pong(1):
            assert isinstance(frame, Push), frame  # no ACK for 9 or 10
        assert handler.submitted == list(range(1, 9))
        assert listener.held_frames("dev-a") == 2
        assert listener.push_backlog("dev-a") == 8  # did not grow

        # The device takes its pushes: at half the backlog its DATA is accepted again.
        device.send(*(Ack(seq) for seq in range(1, 5)))
        acked, pushes = set(), set()
        while acked != {9, 10}:
            frame = await device.recv()
            if isinstance(frame, Ack):
                acked.add(frame.seq)
            elif isinstance(frame, Push):
                pushes.add(frame.seq)
                device.send(Ack(frame.seq))
        assert handler.applied("dev-a") == [(seq, b"r%d" % seq) for seq in range(1, 11)]
        await device.close()
    finally:
        await listener.stop(drain_timeout_s=0.5)


async def test_a_device_that_stops_reading_its_socket_stops_being_read_for_data(
    handler: PushingHandler,
) -> None:
    handler.reply = bytes(60_000)  # pushes fill the send buffer quickly
    listener = await start(handler, send_buffer_limit_bytes=64 << 20, max_unacked_window=512)
    try:
        device = await connect_slow_reader(listener.bound_port, "dev-a")

        # The device stops reading. Its first frames are applied and answered with pushes
        # until the gateway's send buffer is over its high-water mark ...
        seq = 0
        while not listener.stats.extra.get("write_pauses"):
            seq += 1
            assert seq <= 400, "the send buffer never filled"
            device.send(Data(seq, b"d%d" % seq))
            await wait_until(lambda s=seq: handler.submitted[-1:] == [s], 5, f"DATA {seq}")
        accepted = seq
        # ... then its DATA is still read off the socket but no longer accepted.
        device.send(*(Data(s, b"d%d" % s) for s in range(seq + 1, seq + 9)))
        await wait_until(lambda: listener.held_frames("dev-a") == 8, 5, "8 held frames")
        assert handler.submitted == list(range(1, accepted + 1))
        assert not listener.stats.extra.get("slow_consumers")

        # Reading again: everything is acknowledged and applied once, in order.
        last = accepted + 8
        acked: set[int] = set()
        while acked != set(range(1, last + 1)):
            frame = await device.recv()
            if isinstance(frame, Ack):
                acked.add(frame.seq)
            elif isinstance(frame, Push):
                device.send(Ack(frame.seq))
        assert [s for s, _ in handler.applied("dev-a")] == list(range(1, last + 1))
        assert listener.held_frames("dev-a") == 0
        await device.close()
    finally:
        await listener.stop(drain_timeout_s=0.5)
