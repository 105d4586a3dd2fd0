"""Tests for protocols/tcp.py over real sockets, with a LinkHandler that commits to SQLite."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from protocols.frames import (
    Ack,
    Close,
    Data,
    Error,
    ErrorCode,
    Hello,
    HelloOk,
    Ping,
    Pong,
    Push,
    encode,
)
from protocols.link import DedupKey, Link, LinkRejected, Outcome, Route
from protocols.tcp import (
    CONNECTION_LOST_CODE,
    SecretsFileError,
    TcpListener,
    TcpSettings,
    load_secrets_file,
)
from tests.certificates import self_signed
from tests.connect_storm import connect_storm, skip_unless_somaxconn_allows
from tests.frame_device import FrameDevice

SECRETS = {"dev-a": "secret-a", "dev-b": "secret-b", "dev-c": "secret-c"}


class GapError(Exception):
    """A DATA seq skipped past one that was never applied."""


class SqliteLinkHandler:
    """A real LinkHandler: one FIFO worker per route, exactly-once apply into SQLite.

    Mirrors the gateway runtime's contract: events for one route run one at a time in call
    order; a message's future resolves only after its transaction committed; `seq <= last
    applied` is a DUPLICATE. Tests can hold processing (`hold`), fail a seq once, or reject.
    """

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE applied (stream TEXT, seq INTEGER, payload BLOB)")
        self.db.execute("CREATE TABLE last_seq (stream TEXT PRIMARY KEY, seq INTEGER)")
        self.events: list[tuple[Any, ...]] = []
        self.links: dict[str, Link] = {}
        self.released = asyncio.Event()
        self.released.set()
        self.fail_once: set[int] = set()
        self.reject_devices: set[str] = set()
        self.submitted: list[int | None] = []  # DATA seqs handed to the agent, in order
        self._queues: dict[Route, asyncio.Queue] = {}
        self._workers: list[asyncio.Task] = []

    def _enqueue(self, link: Link, event: tuple[Any, ...]) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(link.route)
        if queue is None:
            queue = self._queues[link.route] = asyncio.Queue()
            self._workers.append(asyncio.create_task(self._work(queue)))
        queue.put_nowait((future, link, event))
        return future

    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        self.events.append(("open_called", link.link_id, context["device_id"]))
        return self._enqueue(link, ("open", context))

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        self.submitted.append(dedup.seq if dedup is not None else None)
        return self._enqueue(link, ("message", data, dedup))

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        self.events.append(("close_called", link.link_id, link.route.agent_id, code, reason))
        return self._enqueue(link, ("close", code, reason))

    async def _work(self, queue: asyncio.Queue) -> None:
        while True:
            future, link, event = await queue.get()
            await self.released.wait()
            try:
                outcome = self._apply(link, event)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(outcome)

    def _apply(self, link: Link, event: tuple[Any, ...]) -> Outcome:
        kind = event[0]
        if kind == "open":
            if link.route.agent_id in self.reject_devices:
                raise LinkRejected("device disabled by its agent")
            self.links[link.route.agent_id] = link
            return Outcome.APPLIED
        if kind == "close":
            return Outcome.APPLIED
        _, data, dedup = event
        if dedup.seq in self.fail_once:
            self.fail_once.discard(dedup.seq)
            raise OSError(f"simulated commit failure for seq {dedup.seq}")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute(
                "SELECT seq FROM last_seq WHERE stream = ?", (dedup.stream,)
            ).fetchone()
            last = row[0] if row else None
            if last is not None and dedup.seq <= last:
                self.db.execute("ROLLBACK")
                return Outcome.DUPLICATE
            if last is not None and dedup.seq != last + 1:
                raise GapError(f"seq {dedup.seq} skips past last applied {last}")
            if data == b"forbidden":
                # Refused for good: the seq is consumed (FRAMES.md 5.4), nothing else changes.
                self._set_last_seq(dedup)
                self.db.execute("COMMIT")
                raise LinkRejected("this agent does not accept 'forbidden'")
            self.db.execute("INSERT INTO applied VALUES (?, ?, ?)", (dedup.stream, dedup.seq, data))
            self._set_last_seq(dedup)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return Outcome.APPLIED

    def _set_last_seq(self, dedup: DedupKey) -> None:
        self.db.execute(
            "INSERT INTO last_seq VALUES (?, ?) ON CONFLICT(stream) DO UPDATE SET seq = ?",
            (dedup.stream, dedup.seq, dedup.seq),
        )

    def applied(self, stream: str) -> list[tuple[int, bytes]]:
        return self.db.execute(
            "SELECT seq, payload FROM applied WHERE stream = ? ORDER BY rowid", (stream,)
        ).fetchall()

    async def aclose(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self.db.close()


class Device(FrameDevice):
    """The device of these tests: HELLO with the test secrets, and a PONG barrier."""

    timeout_s = 3.0

    async def hello(self, device_id: str = "dev-a", secret: str | None = None) -> HelloOk:
        self.send(Hello(device_id, SECRETS[device_id] if secret is None else secret))
        reply = await self.recv()
        assert isinstance(reply, HelloOk), reply
        return reply

    async def expect_only_pong(self, seq: int = 1) -> None:
        """A barrier instead of a silence: the gateway handles a connection's frames in order,
        so anything it sends because of earlier frames comes before this PING's PONG."""
        self.send(Ping(seq))
        frame = await self.recv()
        assert frame == Pong(seq), f"expected nothing before PONG {seq}, got {frame}"


async def connect_device(port: int, device_id: str = "dev-a") -> Device:
    device = await Device.connect(port)
    await device.hello(device_id)
    return device


async def connect_slow_reader(port: int, device_id: str = "dev-a") -> Device:
    """A device whose socket has a small (4 KiB) receive buffer, so that the gateway's sends
    back up as soon as the test stops reading."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.setblocking(False)
    device = Device(*await asyncio.open_connection(sock=raw))
    await device.hello(device_id)
    return device


async def until_refused(port: int, timeout_s: float = 3.0) -> None:
    """Wait until the listener no longer accepts connections on `port`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            device = await Device.connect(port)
        except OSError:
            return
        await device.close()
        assert asyncio.get_running_loop().time() < deadline, f"port {port} still accepts"
        await asyncio.sleep(0.01)


async def eventually(check: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def handler(tmp_path: Path) -> AsyncIterator[SqliteLinkHandler]:
    handler = SqliteLinkHandler(tmp_path / "agents.sqlite3")
    yield handler
    handler.released.set()
    await handler.aclose()


ListenerFactory = Callable[..., Awaitable[TcpListener]]


@pytest.fixture
async def make_listener(handler: SqliteLinkHandler) -> AsyncIterator[ListenerFactory]:
    listeners: list[TcpListener] = []

    async def make(ssl_context: ssl.SSLContext | None = None, **overrides: Any) -> TcpListener:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "agent_class": "thermostat",
            "secrets": SECRETS,
            "hello_timeout_s": 2.0,
            "settle_timeout_s": 2.0,
        }
        options.update(overrides)
        listener = TcpListener(TcpSettings(**options), handler, ssl_context=ssl_context)
        await listener.start()
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        await listener.stop(drain_timeout_s=0.5)


@pytest.fixture
async def listener(make_listener: ListenerFactory) -> TcpListener:
    return await make_listener()


# ---------------------------------------------------------------- authentication


async def test_hello_ok_announces_limits_and_opens_the_routed_link(
    make_listener: ListenerFactory, handler: SqliteLinkHandler
) -> None:
    listener = await make_listener(max_unacked_window=7, ping_interval_s=12.5)
    device = await Device.connect(listener.bound_port)
    hello_ok = await device.hello("dev-a")
    assert hello_ok.max_unacked == 7
    assert hello_ok.ping_interval_ms == 12500
    assert hello_ok.max_frame_bytes == 65536
    assert hello_ok.push_epoch == listener.push_epoch
    link = handler.links["dev-a"]
    assert link.route == Route("thermostat", "dev-a")
    assert link.transport == "tcp"
    assert link.remote.startswith("127.0.0.1:")
    assert listener.stats.links_open == 1
    await device.close()
    await eventually(lambda: listener.stats.links_open == 0)
    assert handler.events[-1][2:4] == ("dev-a", CONNECTION_LOST_CODE)


@pytest.mark.parametrize(
    ("device_id", "secret"), [("dev-a", "guess-123"), ("nobody", "secret-a"), ("dev-a", "secret-b")]
)
async def test_bad_credentials_get_auth_failed_and_close(
    listener: TcpListener,
    handler: SqliteLinkHandler,
    device_id: str,
    secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = await Device.connect(listener.bound_port)
    device.send(Hello(device_id, secret))
    frames = await device.recv_until_closed()
    assert frames == [Error(ErrorCode.AUTH_FAILED, "authentication failed")]
    assert handler.events == []  # no link was opened
    assert f"authentication failed for device {device_id!r}" in caplog.text
    assert secret not in caplog.text


async def test_auth_failures_are_rate_limited_per_ip(make_listener: ListenerFactory) -> None:
    listener = await make_listener(auth_failure_limit=2, auth_failure_window_s=60.0)
    for _ in range(2):
        device = await Device.connect(listener.bound_port)
        device.send(Hello("dev-a", "wrong"))
        assert (await device.recv_until_closed())[0].code == ErrorCode.AUTH_FAILED
    # Now even the right secret is refused from this address.
    device = await Device.connect(listener.bound_port)
    device.send(Hello("dev-a", "secret-a"))
    frames = await device.recv_until_closed()
    assert [f.code for f in frames] == [ErrorCode.RATE_LIMITED]
    assert listener.stats.extra["auth_rate_limited"] == 1


async def test_agent_refusing_the_link_gets_rejected(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    handler.reject_devices.add("dev-b")
    device = await Device.connect(listener.bound_port)
    device.send(Hello("dev-b", "secret-b"))
    frames = await device.recv_until_closed()
    assert frames == [Error(ErrorCode.REJECTED, "device disabled by its agent")]
    # The refused connection does not linger as the device's live connection.
    handler.reject_devices.clear()
    device = await connect_device(listener.bound_port, "dev-b")
    handler.links["dev-b"].send(b"hello")
    assert await device.recv() == Push(1, b"hello")
    # The agent refused the first link: it never existed for the handler, so no close_link
    # for it (checked once the second link is up: a barrier instead of a fixed sleep).
    assert [e[0] for e in handler.events] == ["open_called", "open_called"]


async def test_an_agent_that_never_opens_the_link_times_out(
    make_listener: ListenerFactory, handler: SqliteLinkHandler
) -> None:
    listener = await make_listener(hello_timeout_s=0.3)
    handler.released.clear()  # open_link's future never resolves
    device = await Device.connect(listener.bound_port)
    device.send(Hello("dev-a", "secret-a"))
    frames = await device.recv_until_closed()
    assert frames == [
        Error(ErrorCode.NOT_APPLIED, "the device's agent did not answer; retry later")
    ]
    await eventually(lambda: handler.events[-1][0] == "close_called")


async def test_hello_timeout_closes_a_silent_connection(make_listener: ListenerFactory) -> None:
    listener = await make_listener(hello_timeout_s=0.2)
    device = await Device.connect(listener.bound_port)
    frames = await device.recv_until_closed()
    assert [f.code for f in frames] == [ErrorCode.HELLO_TIMEOUT]


async def test_data_pipelined_behind_hello_is_refused_and_the_link_closed(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await Device.connect(listener.bound_port)
    device.send(Hello("dev-a", "secret-a"), Data(1, b"too early"))  # one segment
    frames = await device.recv_until_closed()
    assert frames == [Error(ErrorCode.HELLO_REQUIRED, "DATA frame before HELLO_OK was sent")]
    await eventually(lambda: handler.events[-1][0] == "close_called")
    assert handler.events[-1][3] == ErrorCode.HELLO_REQUIRED
    assert handler.applied("dev-a") == []
    # Sent properly, the same frame goes through.
    device = await connect_device(listener.bound_port)
    device.send(Data(1, b"on time"))
    assert await device.recv() == Ack(1)


async def test_a_wrong_secret_with_pipelined_data_is_auth_failed(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await Device.connect(listener.bound_port)
    device.send(Hello("dev-a", "wrong"), Data(1, b"x"))
    frames = await device.recv_until_closed()
    assert frames == [Error(ErrorCode.AUTH_FAILED, "authentication failed")]
    assert handler.events == []


# ---------------------------------------------------------------- data, acks, exactly-once


async def test_ack_is_sent_only_after_the_commit(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    handler.released.clear()  # the agent's turn does not run yet
    device.send(Data(1, b"reading-1"))
    await eventually(lambda: handler.submitted == [1])
    await device.expect_only_pong()  # no ACK while the turn has not committed
    assert handler.applied("dev-a") == []
    handler.released.set()
    assert await device.recv() == Ack(1)
    assert handler.applied("dev-a") == [(1, b"reading-1")]


async def test_pipelined_frames_are_applied_in_order_and_each_acked(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    device.send(*(Data(seq, f"m{seq}".encode()) for seq in range(1, 21)))
    acks = [await device.recv() for _ in range(20)]
    assert acks == [Ack(seq) for seq in range(1, 21)]
    assert handler.applied("dev-a") == [(seq, f"m{seq}".encode()) for seq in range(1, 21)]
    assert listener.stats.messages_in == 20


async def test_frames_and_outcomes_are_counted_in_the_metrics(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    frames = "gatewayd_tcp_frames_received_total"
    outcomes = "gatewayd_tcp_data_outcomes_total"
    before = (sample(frames, type="DATA"), sample(outcomes, outcome="applied"))
    before_duplicates = sample(outcomes, outcome="duplicate")
    device = await connect_device(listener.bound_port)
    device.send(Data(1, b"a"), Data(2, b"b"), Data(3, b"c"))
    assert [await device.recv() for _ in range(3)] == [Ack(1), Ack(2), Ack(3)]
    await device.close()
    device = await Device.connect(listener.bound_port)
    await device.hello()
    device.send(Data(3, b"c", resend=True))
    assert await device.recv() == Ack(3)
    # Ints read at scrape time (tcp_metrics.py): exact as soon as the frames were handled.
    assert (sample(frames, type="DATA"), sample(outcomes, outcome="applied")) == (
        before[0] + 4,
        before[1] + 3,
    )
    assert sample(outcomes, outcome="duplicate") == before_duplicates + 1


async def test_a_lone_data_frame_is_counted_without_an_end_of_iteration_callback(
    listener: TcpListener, handler: SqliteLinkHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paced load: every frame is alone in its loop iteration. Its counters are ints read at
    scrape time (tcp_metrics.py), so counting it schedules nothing: no end-of-iteration
    callback (and its extra loop iteration) per frame; only queued pushes use that flush."""
    from prometheus_client import REGISTRY

    scheduled: list[int] = []
    schedule = listener._schedule_end_of_iteration

    def counting_schedule() -> None:
        scheduled.append(1)
        schedule()

    device = await connect_device(listener.bound_port)
    monkeypatch.setattr(listener, "_schedule_end_of_iteration", counting_schedule)
    before = REGISTRY.get_sample_value("gatewayd_tcp_frames_received_total", {"type": "DATA"})
    for seq in (1, 2, 3):
        device.send(Data(seq, b"x"))
        assert await device.recv() == Ack(seq)
    assert scheduled == []
    after = REGISTRY.get_sample_value("gatewayd_tcp_frames_received_total", {"type": "DATA"})
    assert (after or 0.0) - (before or 0.0) == 3
    await device.close()


async def test_retransmission_after_reconnect_is_acked_but_not_applied_twice(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    device.send(Data(1, b"a"), Data(2, b"b"))
    assert [await device.recv(), await device.recv()] == [Ack(1), Ack(2)]
    # Seq 3 is committed but its ACK is lost: the device drops the connection at once.
    handler.released.clear()
    device.send(Data(3, b"c"))
    await eventually(lambda: handler.submitted[-1:] == [3])
    await device.close()
    handler.released.set()
    await eventually(lambda: len(handler.applied("dev-a")) == 3)

    device = await connect_device(listener.bound_port)
    device.send(Data(2, b"b", resend=True), Data(3, b"c", resend=True), Data(4, b"d"))
    assert [await device.recv() for _ in range(3)] == [Ack(2), Ack(3), Ack(4)]
    assert handler.applied("dev-a") == [(1, b"a"), (2, b"b"), (3, b"c"), (4, b"d")]
    assert listener.stats.extra["data_duplicates"] == 2
    assert listener.stats.extra["data_resent"] == 2


async def test_failed_commit_sends_error_then_resend_applies_exactly_once(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    handler.fail_once.add(2)
    device.send(Data(1, b"a"), Data(2, b"b"), Data(3, b"c"))
    frames = await device.recv_until_closed()
    # 1 committed; 2 failed; 3 was not applied either (it would skip past 2): no ACK for either.
    assert frames[0] == Ack(1)
    assert frames[1] == Error(
        ErrorCode.NOT_APPLIED, "not applied; retransmit after reconnecting", 2
    )
    assert Ack(3) not in frames
    assert frames[-1] == Close(ErrorCode.NOT_APPLIED, "not applied; retransmit after reconnecting")
    assert handler.applied("dev-a") == [(1, b"a")]

    device = await connect_device(listener.bound_port)
    device.send(Data(2, b"b", resend=True), Data(3, b"c", resend=True))
    assert [await device.recv(), await device.recv()] == [Ack(2), Ack(3)]
    assert handler.applied("dev-a") == [(1, b"a"), (2, b"b"), (3, b"c")]


async def test_data_refused_by_the_agent_gets_rejected_and_close(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    device.send(Data(1, b"fine"), Data(2, b"forbidden"))
    frames = await device.recv_until_closed()
    reason = "this agent does not accept 'forbidden'"
    assert frames == [
        Ack(1),
        Error(ErrorCode.REJECTED, reason, 2),
        Close(ErrorCode.REJECTED, reason),
    ]
    assert handler.applied("dev-a") == [(1, b"fine")]
    # The device drops the rejected frame and carries on with the next seq.
    device = await connect_device(listener.bound_port)
    device.send(Data(3, b"next"))
    assert await device.recv() == Ack(3)
    assert handler.applied("dev-a") == [(1, b"fine"), (3, b"next")]


async def test_window_is_enforced(
    make_listener: ListenerFactory, handler: SqliteLinkHandler
) -> None:
    listener = await make_listener(max_unacked_window=2)
    device = await connect_device(listener.bound_port)
    handler.released.clear()
    device.send(Data(1, b"a"), Data(2, b"b"))  # a full window is fine
    await device.expect_only_pong()
    device.send(Data(3, b"c"))
    frame = await device.recv()
    assert frame.code == ErrorCode.WINDOW_EXCEEDED
    assert "DATA seq 3 exceeds the window of 2" in frame.message
    handler.released.set()
    assert await device.recv_until_closed() == []  # nothing after a fatal ERROR


async def test_data_seq_must_increase_on_a_connection(listener: TcpListener) -> None:
    device = await connect_device(listener.bound_port)
    device.send(Data(5, b"a"))
    assert await device.recv() == Ack(5)
    device.send(Data(5, b"a"))
    frames = await device.recv_until_closed()
    assert [f.code for f in frames] == [ErrorCode.BAD_SEQ]


# ---------------------------------------------------------------- pushes


async def test_push_delivered_acked_and_resent_on_reconnect(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    handler.links["dev-a"].send(b"set 21.5")
    handler.links["dev-a"].send("text from the agent")
    assert await device.recv() == Push(1, b"set 21.5")
    assert await device.recv() == Push(2, b"text from the agent")
    device.send(Ack(1))  # push 2 stays unacknowledged
    await device.expect_only_pong()  # the ACK was handled
    await device.close()
    await eventually(lambda: listener.stats.links_open == 0)
    handler.links["dev-a"].send(b"while offline")

    device = await Device.connect(listener.bound_port)
    await device.hello("dev-a")
    assert await device.recv() == Push(2, b"text from the agent", resend=True)
    assert await device.recv() == Push(3, b"while offline")
    device.send(Ack(2), Ack(3), Ack(99))  # an unknown push seq is ignored
    await device.expect_only_pong()  # the ACKs were handled
    await device.close()
    await eventually(lambda: listener.stats.links_open == 0)

    device = await connect_device(listener.bound_port)
    await device.expect_only_pong()  # everything was acknowledged: no resend after HELLO_OK


# ---------------------------------------------------------------- liveness


async def test_ping_is_answered_with_pong(listener: TcpListener) -> None:
    device = await connect_device(listener.bound_port)
    device.send(Ping(77))
    assert await device.recv() == Pong(77)


async def test_gateway_pings_an_idle_device_and_keeps_it_if_it_answers(
    make_listener: ListenerFactory,
) -> None:
    listener = await make_listener(ping_interval_s=0.15, ping_timeout_s=0.3)
    device = await connect_device(listener.bound_port)
    for _ in range(3):
        ping = await device.recv(1.0)
        assert isinstance(ping, Ping)
        device.send(Pong(ping.seq))
    assert listener.stats.links_open == 1


async def test_ping_timeout_closes_a_dead_device(
    make_listener: ListenerFactory, handler: SqliteLinkHandler
) -> None:
    listener = await make_listener(ping_interval_s=0.1, ping_timeout_s=0.2)
    device = await connect_device(listener.bound_port)
    frames = await device.recv_until_closed()
    assert isinstance(frames[0], Ping)
    assert frames[-1].code == ErrorCode.PING_TIMEOUT
    await eventually(lambda: handler.events[-1][0] == "close_called")
    assert handler.events[-1][3] == ErrorCode.PING_TIMEOUT


async def test_a_trickle_of_bytes_does_not_count_as_liveness(
    make_listener: ListenerFactory,
) -> None:
    listener = await make_listener(ping_interval_s=0.1, ping_timeout_s=0.2)
    device = await connect_device(listener.bound_port)
    partial = encode(Data(1, b"x" * 100))
    closed = asyncio.create_task(device.recv_until_closed())
    for i in range(40):  # one byte every 25 ms: never a whole frame
        if closed.done():
            break
        device.send_raw(partial[i : i + 1])
        await asyncio.sleep(0.025)
    frames = await closed
    assert frames[-1].code == ErrorCode.PING_TIMEOUT


# ---------------------------------------------------------------- bad input


BAD_INPUTS = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.FRAME_TOO_LARGE),
    "bad magic": (b"\x00\x00\x00\x0b\x7b" + bytes(10), ErrorCode.BAD_MAGIC),
    "oversized": ((70000).to_bytes(4, "big"), ErrorCode.FRAME_TOO_LARGE),
    "unknown type": (b"\x00\x00\x00\x0b\xa1\x17" + bytes(9), ErrorCode.UNKNOWN_TYPE),
    "invalid cbor": (
        b"\x00\x00\x00\x0c\xa1\x10\x00" + (1).to_bytes(8, "big") + b"\xff",
        ErrorCode.INVALID_CBOR,
    ),
    "data before hello": (encode(Data(1, b"x")), ErrorCode.HELLO_REQUIRED),
    "push from device": (encode(Push(1, b"x")), ErrorCode.UNEXPECTED),
    "hello_ok with a bad body": (
        b"\x00\x00\x00\x0c\xa1\x02\x00" + bytes(8) + b"\xa0",
        ErrorCode.BAD_BODY,
    ),
    "hello_ok from a device": (encode(HelloOk(65536, 1, 0, 0)), ErrorCode.UNEXPECTED),
    "truncated": (encode(Data(1, b"abcdef"))[:10], ErrorCode.TRUNCATED),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_gets_its_error_and_close_while_others_keep_working(
    listener: TcpListener, handler: SqliteLinkHandler, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="protocols.tcp")
    bystander = await connect_device(listener.bound_port, "dev-b")
    bystander.send(Data(1, b"before"))
    assert await bystander.recv() == Ack(1)

    wire, code = BAD_INPUTS[case]
    culprit = await Device.connect(listener.bound_port)
    if case in ("push from device", "invalid cbor", "truncated"):
        await culprit.hello("dev-a")
    culprit.send_raw(wire)
    if case == "truncated":
        culprit.writer.write_eof()  # half-close in the middle of a frame
    frames = await culprit.recv_until_closed()
    assert len(frames) == 1 and isinstance(frames[0], Error), frames
    assert frames[0].code == code
    assert f"[{code.name}]; closing" in caplog.text

    bystander.send(Data(2, b"after"))
    assert await bystander.recv() == Ack(2)
    assert handler.applied("dev-b") == [(1, b"before"), (2, b"after")]
    assert handler.applied("dev-a") == []


async def test_slow_reader_is_disconnected_without_stalling_others(
    make_listener: ListenerFactory, handler: SqliteLinkHandler
) -> None:
    listener = await make_listener(send_buffer_limit_bytes=128 * 1024, max_pending_pushes=1000)
    slow = await connect_slow_reader(listener.bound_port, "dev-a")
    fast = await connect_device(listener.bound_port, "dev-b")

    payload = bytes(60_000)
    for _ in range(400):  # ~24 MB, far more than the kernel buffers hold
        handler.links["dev-a"].send(payload)
        if listener.stats.extra.get("slow_consumers"):
            break
    assert listener.stats.extra["slow_consumers"] == 1
    await eventually(
        lambda: any(e[0] == "close_called" and e[2] == "dev-a" for e in handler.events)
    )
    assert any(e[0] == "close_called" and e[3] == ErrorCode.SLOW_CONSUMER for e in handler.events)

    fast.send(Data(1, b"still served"))
    assert await fast.recv() == Ack(1)
    await slow.close()


# ---------------------------------------------------------------- connection management


async def test_max_connections_refuses_extra_connections(make_listener: ListenerFactory) -> None:
    listener = await make_listener(max_connections=2)
    first = await connect_device(listener.bound_port, "dev-a")
    await connect_device(listener.bound_port, "dev-b")
    refused = await Device.connect(listener.bound_port)
    frames = await refused.recv_until_closed()
    assert [f.code for f in frames] == [ErrorCode.SERVER_BUSY]
    await first.close()
    await eventually(lambda: listener.stats.links_open == 1)
    await connect_device(listener.bound_port, "dev-c")


async def test_a_connect_storm_is_queued_by_the_kernel_not_dropped(
    make_listener: ListenerFactory,
) -> None:
    """While the loop is busy (here: blocked by this test), the kernel completes the
    handshakes of up to max_connections connections for the listener to accept later; with
    asyncio's default backlog (100) it dropped the SYNs of the rest, which then waited 1, 3,
    7 s for their retransmits (issue 9: a thousand devices connecting at once)."""
    storm = 250
    skip_unless_somaxconn_allows(storm)
    listener = await make_listener(max_connections=storm + 10)
    assert connect_storm(listener.bound_port, storm) == storm


async def test_new_connection_replaces_the_old_one_for_the_same_device(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    old = await connect_device(listener.bound_port)
    old_link = handler.links["dev-a"]
    new = await connect_device(listener.bound_port)
    assert handler.links["dev-a"] is not old_link
    frames = await old.recv_until_closed()
    assert frames[-1].code == ErrorCode.REPLACED
    kinds = [(e[0], e[1]) for e in handler.events]
    # close_link(old) was called before open_link(new)
    assert kinds.index(("close_called", old_link.link_id)) < kinds.index(
        ("open_called", handler.links["dev-a"].link_id)
    )
    new.send(Data(1, b"x"))
    assert await new.recv() == Ack(1)
    assert listener.stats.links_open == 1


async def test_orderly_close_from_the_device(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    device.send(Data(1, b"last words"), Close(1000, "powering down"))
    frames = await device.recv_until_closed()
    assert frames == [Ack(1), Close(1000, "")]
    await eventually(lambda: handler.events[-1][0] == "close_called")
    assert handler.events[-1][3:] == (1000, "powering down")


async def test_agent_closing_the_link_sends_close(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    device = await connect_device(listener.bound_port)
    handler.links["dev-a"].close(4001, "firmware too old")
    assert await device.recv_until_closed() == [Close(4001, "firmware too old")]


async def test_stop_drains_in_flight_acks_before_closing(
    listener: TcpListener, handler: SqliteLinkHandler
) -> None:
    port = listener.bound_port
    device = await connect_device(port)
    handler.released.clear()
    device.send(Data(1, b"in flight"))
    await eventually(lambda: handler.submitted == [1])
    stopping = asyncio.create_task(listener.stop(drain_timeout_s=2.0))
    await until_refused(port)  # stopped accepting, while the frame is still in flight
    assert not stopping.done()
    handler.released.set()
    await stopping
    frames = await device.recv_until_closed()
    assert frames == [Ack(1), Close(ErrorCode.GOING_AWAY, "gateway shutting down")]


async def test_tls_connection(
    make_listener: ListenerFactory, handler: SqliteLinkHandler, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    listener = await make_listener(ssl_context=server_context)
    client_context = ssl.create_default_context(cafile=str(cert))
    device = await Device.connect(
        listener.bound_port, ssl=client_context, server_hostname="localhost"
    )
    await device.hello("dev-a")
    device.send(Data(1, b"over tls"))
    assert await device.recv() == Ack(1)
    assert handler.applied("dev-a") == [(1, b"over tls")]
    await device.close()


def test_listener_on_uvloop(tmp_path: Path) -> None:
    """The daemon runs on uvloop where installed; its transports are not asyncio.Transport."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        handler = SqliteLinkHandler(tmp_path / "uv.sqlite3")
        settings = TcpSettings(host="127.0.0.1", port=0, agent_class="t", secrets=SECRETS)
        listener = TcpListener(settings, handler)
        await listener.start()
        try:
            device = await connect_device(listener.bound_port)
            device.send(Data(1, b"on uvloop"), Ping(3))
            assert [await device.recv(), await device.recv()] == [Pong(3), Ack(1)]
            handler.links["dev-a"].send(b"cmd")
            assert await device.recv() == Push(1, b"cmd")
            device.send(Close(1000, "done"))
            assert await device.recv_until_closed() == [Close(1000, "")]
        finally:
            await listener.stop(drain_timeout_s=0.5)
            await handler.aclose()

    uvloop.run(scenario())


async def test_the_minimal_python_device_in_frames_md_works(
    make_listener: ListenerFactory, handler: SqliteLinkHandler
) -> None:
    text = (Path(__file__).resolve().parents[2] / "protocols" / "FRAMES.md").read_text()
    code = text.split("## 10. A minimal device in Python", 1)[1].split("```python\n", 1)[1]
    code = code.split("```", 1)[0]
    listener = await make_listener(secrets={"thermo-1": "example-secret-1"})
    documented_address = 'HOST, PORT = "127.0.0.1", 7878'
    assert documented_address in code
    code = code.replace(documented_address, f'HOST, PORT = "127.0.0.1", {listener.bound_port}')
    await asyncio.to_thread(exec, code, {})
    assert handler.applied("thermo-1") == [(1, b'{"temp": 21.5}')]


# ---------------------------------------------------------------- settings and secrets


def test_load_secrets_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "devices.toml"
    path.write_text('# comment\n"thermo-42" = "s3cret"\npump-7 = "other"\n')
    path.chmod(0o640)
    assert load_secrets_file(path) == {"thermo-42": "s3cret", "pump-7": "other"}
    assert "accessible by all users" not in caplog.text
    path.chmod(0o644)
    load_secrets_file(path)
    assert "accessible by all users (mode 644)" in caplog.text


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("dev = 5\n", "value of 'dev' must be a string secret, got int"),
        ("dev = \n", "not valid TOML"),
        ('"bad\\nid" = "s"\n', "control characters"),
        ('dev = ""\n', "secret must be 1..256 UTF-8 bytes"),
    ],
)
def test_load_secrets_file_errors_name_the_entry(
    tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(content)
    with pytest.raises(SecretsFileError, match=r"devices\.toml") as info:
        load_secrets_file(path)
    assert fragment in str(info.value)
    with pytest.raises(SecretsFileError, match="cannot read"):
        load_secrets_file(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"port": 70000}, "port must be 0..65535"),
        ({"max_frame_bytes": 100}, "max_frame_bytes must be >= 256"),
        ({"max_unacked_window": 0}, "max_unacked_window must be >= 1"),
        ({"ping_timeout_s": 0}, "ping_timeout_s must be > 0"),
        ({"send_buffer_limit_bytes": 1000}, "send_buffer_limit_bytes (1000) must be >="),
    ],
)
def test_settings_are_validated(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        TcpSettings(agent_class="thermostat", **overrides)
    assert fragment in str(info.value)


def test_settings_repr_hides_secrets() -> None:
    assert "secret-a" not in repr(TcpSettings(agent_class="t", secrets=SECRETS))


def test_settings_defaults_are_the_config_models() -> None:
    """One schema: a listener built without the daemon behaves like an empty [listeners.binary]."""
    from gatewayd.config import BinaryListener

    config, settings = BinaryListener(), TcpSettings(agent_class="thermostat")
    assert (settings.host, settings.port) == config.bind == ("127.0.0.1", 7878)
    assert settings.max_unacked_window == config.max_unacked == 64
    assert settings.max_frame_bytes == config.max_frame_size
    assert settings.max_connections == config.max_connections
    assert settings.hello_timeout_s == config.hello_timeout
    assert settings.ping_interval_s == config.ping_interval
    assert settings.ping_timeout_s == config.ping_timeout
