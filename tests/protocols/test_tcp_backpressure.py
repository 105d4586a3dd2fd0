"""Backpressure on the TCP listener: a full agent mailbox holds the connection's input (no ACK,
no ERROR, reading paused) and the same frame is resubmitted, in order, once there is room."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from protocols.frames import Ack, Close, Data, Error, ErrorCode, Hello
from protocols.link import Backpressure, DedupKey, Link, LinkRejected, Outcome
from protocols.tcp import TcpListener, TcpSettings
from tests.frame_device import FrameDevice

pytestmark = pytest.mark.timeout(60)

SECRETS = {"dev-a": "secret-a"}


class BoundedHandler:
    """A real LinkHandler whose mailbox holds `capacity` messages; one worker applies them one
    at a time while `released` is set. A submit into a full mailbox enqueues nothing and
    answers Backpressure (raised, or as an already failed future when `mode == "future"`)."""

    def __init__(self, capacity: int, mode: str = "raise") -> None:
        self.capacity = capacity
        self.mode = mode
        self.mailbox: deque[tuple[asyncio.Future[Outcome], int]] = deque()
        self.attempts: list[int] = []  # the seq of every submit_message call, in call order
        self.pushed_back: list[int] = []
        self.applied: list[int] = []
        self.released = asyncio.Event()
        self.shutting_down = False
        self._room: asyncio.Future[None] | None = None
        self.open_attempts = 0
        self.opens_held = False  # open_link answers Backpressure until allow_opens()
        self._open_room: asyncio.Future[None] | None = None
        self.closed_links: list[str] = []
        self._work_ready = asyncio.Event()
        self._worker = asyncio.create_task(self._work())

    def _done(self, outcome: Outcome = Outcome.APPLIED) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        future.set_result(outcome)
        return future

    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        self.open_attempts += 1
        if not self.opens_held:
            return self._done()
        if self._open_room is None:
            self._open_room = asyncio.get_running_loop().create_future()
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        future.set_exception(Backpressure("mailbox full", self._open_room))
        return future

    def allow_opens(self) -> None:
        self.opens_held = False
        if self._open_room is not None:
            self._open_room.set_result(None)

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        self.closed_links.append(link.link_id)
        return self._done()

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        assert dedup is not None
        self.attempts.append(dedup.seq)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if self.shutting_down:
            future.set_exception(LinkRejected("shutting down", code=1001))
            return future
        if len(self.mailbox) >= self.capacity:
            self.pushed_back.append(dedup.seq)
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            pushed_back = Backpressure("mailbox full", self._room)
            if self.mode == "raise":
                raise pushed_back
            future.set_exception(pushed_back)
            return future
        self.mailbox.append((future, dedup.seq))
        self._work_ready.set()
        return future

    def shut_down(self) -> None:
        self.shutting_down = True
        self._make_room()

    def _make_room(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def _work(self) -> None:
        while True:
            await self._work_ready.wait()
            await self.released.wait()
            if not self.mailbox:
                self._work_ready.clear()
                continue
            future, seq = self.mailbox[0]
            self.applied.append(seq)
            self.mailbox.popleft()
            future.set_result(Outcome.APPLIED)
            self._make_room()
            await asyncio.sleep(0)  # one message per loop iteration, like a turn

    async def aclose(self) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def serving(
    handler: BoundedHandler, *, hello: bool = True, hello_timeout_s: float = 5.0
) -> AsyncIterator[tuple[TcpListener, FrameDevice]]:
    settings = TcpSettings(
        host="127.0.0.1",
        port=0,
        agent_class="thermostat",
        secrets=SECRETS,
        settle_timeout_s=5.0,
        hello_timeout_s=hello_timeout_s,
    )
    listener = TcpListener(settings, handler)  # type: ignore[arg-type]
    await listener.start()
    try:
        device = await FrameDevice.connect(listener.bound_port)
        if hello:
            device.send(Hello("dev-a", SECRETS["dev-a"]))
            assert (await device.recv()).TYPE.name == "HELLO_OK"
        yield listener, device
    finally:
        handler.released.set()
        await listener.stop(drain_timeout_s=1.0)
        await handler.aclose()


def server_transport(listener: TcpListener) -> asyncio.Transport:
    (connection,) = listener._connections  # the transport-level fact under test
    assert connection._transport is not None
    return connection._transport


@pytest.mark.parametrize("mode", ["raise", "future"])
async def test_full_mailbox_pauses_reading_and_resubmits_in_order(mode: str) -> None:
    handler = BoundedHandler(capacity=2, mode=mode)
    async with serving(handler) as (listener, device):
        device.send(*(Data(seq, f"m{seq}".encode()) for seq in range(1, 9)))
        await eventually(lambda: handler.pushed_back == [3])
        # Seq 3 is held: nothing behind it is submitted, and the socket is not read.
        assert handler.attempts == [1, 2, 3]
        assert not server_transport(listener).is_reading()
        assert listener.stats.extra["backpressure_pauses"] == 1

        handler.released.set()
        frames = [await device.recv() for _ in range(8)]
        assert frames == [Ack(seq) for seq in range(1, 9)]  # no ERROR, every frame once
        assert handler.applied == list(range(1, 9))
        # Each pushed-back frame was submitted again, never overtaken by a later one.
        assert handler.attempts == sorted(handler.attempts)
        assert set(handler.pushed_back) < set(handler.attempts)
        assert listener.stats.messages_in == 8
        assert server_transport(listener).is_reading()


async def test_frames_behind_a_held_frame_wait_for_it_including_close() -> None:
    handler = BoundedHandler(capacity=1)
    async with serving(handler) as (_listener, device):
        device.send(Data(1, b"a"), Data(2, b"b"), Close(1000, "done"))
        await eventually(lambda: handler.pushed_back == [2])
        handler.released.set()
        assert await device.recv_until_closed() == [Ack(1), Ack(2), Close(1000, "")]
        assert handler.applied == [1, 2]


async def test_a_held_frame_refused_because_the_gateway_shuts_down_is_retryable() -> None:
    handler = BoundedHandler(capacity=1)
    async with serving(handler) as (_listener, device):
        device.send(Data(1, b"a"), Data(2, b"b"))
        await eventually(lambda: handler.pushed_back == [2])
        handler.shut_down()  # `ready` resolves; the resubmission gets LinkRejected(1001)
        await eventually(lambda: handler.attempts == [1, 2, 2])
        handler.released.set()
        frames = await device.recv_until_closed()
        message = "not applied; retransmit after reconnecting"
        # NOT_APPLIED (keep and resend), not REJECTED (drop): the frame was never refused.
        assert frames == [
            Error(ErrorCode.NOT_APPLIED, message, 2),
            Ack(1),
            Close(ErrorCode.NOT_APPLIED, message),
        ]


async def test_a_pushed_back_open_is_retried_once_the_agent_has_room() -> None:
    handler = BoundedHandler(capacity=4)
    handler.opens_held = True
    async with serving(handler, hello=False) as (_listener, device):
        device.send(Hello("dev-a", SECRETS["dev-a"]))
        await eventually(lambda: handler.open_attempts == 1)
        handler.allow_opens()
        assert (await device.recv()).TYPE.name == "HELLO_OK"
        assert handler.open_attempts == 2
        handler.released.set()
        device.send(Data(1, b"a"))
        assert await device.recv() == Ack(1)


async def test_a_pushed_back_open_that_never_gets_room_times_out_without_close_link() -> None:
    handler = BoundedHandler(capacity=4)
    handler.opens_held = True
    async with serving(handler, hello=False, hello_timeout_s=0.3) as (listener, device):
        device.send(Hello("dev-a", SECRETS["dev-a"]))
        frames = await device.recv_until_closed()
        assert frames == [
            Error(ErrorCode.NOT_APPLIED, "the device's agent did not answer; retry later")
        ]
        await eventually(lambda: not listener._connections)
        assert handler.closed_links == []  # the handler never took the link
        handler.allow_opens()  # a late `ready` opens nothing
        await asyncio.sleep(0)
        assert handler.open_attempts == 1


async def test_a_real_runtime_with_a_full_mailbox_applies_everything_once_in_order(
    tmp_path: Path,
) -> None:
    """End to end: AgentRuntime with a 2-event mailbox and a slow agent; 30 pipelined frames."""
    gate = asyncio.Event()

    class Slow(Agent):
        def on_start(self) -> None:
            self.sql("CREATE TABLE IF NOT EXISTS got (payload TEXT)")

        async def on_message(self, conn, message) -> None:
            await gate.wait()
            self.sql("INSERT INTO got VALUES (?)", bytes(message).decode())

        @callable
        def got(self) -> list[str]:
            return [row["payload"] for row in self.sql("SELECT payload FROM got ORDER BY rowid")]

    runtime = AgentRuntime(
        AgentSettings(state_dir=tmp_path, max_mailbox_events=2), {"thermostat": Slow}
    )
    await runtime.start()
    settings = TcpSettings(host="127.0.0.1", port=0, agent_class="thermostat", secrets=SECRETS)
    listener = TcpListener(settings, runtime)
    await listener.start()
    try:
        device = await FrameDevice.connect(listener.bound_port)
        device.send(Hello("dev-a", SECRETS["dev-a"]))
        assert (await device.recv()).TYPE.name == "HELLO_OK"
        device.send(*(Data(seq, f"m{seq}".encode()) for seq in range(1, 31)))
        await eventually(lambda: listener.stats.extra.get("backpressure_pauses", 0) >= 1)
        assert runtime.stats()["mailbox_full_total"] >= 1
        gate.set()
        assert [await device.recv() for _ in range(30)] == [Ack(seq) for seq in range(1, 31)]
        expected = [f"m{seq}" for seq in range(1, 31)]
        assert await runtime.call("thermostat", "dev-a", "got") == expected
    finally:
        gate.set()
        await listener.stop(drain_timeout_s=2.0)
        await runtime.close()
