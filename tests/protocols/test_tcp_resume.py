"""A device that reserves seqs in blocks reboots and skips some (FRAMES.md 5.6): over a real
socket, against a real AgentRuntime with its SQLite files, across a gateway restart."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gatewayd.agents import Agent, AgentRuntime, AgentSettings, callable
from protocols.frames import Ack, Close, Data, Error, ErrorCode, Hello
from protocols.tcp import TcpListener, TcpSettings
from tests.frame_device import FrameDevice

pytestmark = pytest.mark.timeout(60)

SECRETS = {"thermo-42": "s3cret"}


class Logger(Agent):
    """Stores every DATA payload it is given, in its own SQLite."""

    def on_start(self) -> None:
        self.sql("CREATE TABLE IF NOT EXISTS readings (payload TEXT)")

    def on_message(self, conn, message) -> None:
        self.sql("INSERT INTO readings VALUES (?)", bytes(message).decode())

    @callable
    def readings(self) -> list[str]:
        return [row["payload"] for row in self.sql("SELECT payload FROM readings ORDER BY rowid")]


class Device(FrameDevice):
    """Connects as thermo-42 (HELLO with `resume_seq`) and sends DATA the gateway ACKs."""

    @classmethod
    async def connect_hello(cls, port: int, resume_seq: int = 0) -> Device:
        device = await cls.connect(port)
        device.send(Hello("thermo-42", SECRETS["thermo-42"], resume_seq=resume_seq))
        reply = await device.recv()
        assert reply.TYPE.name == "HELLO_OK", reply
        return device

    async def send_and_ack(self, *seqs: int, resend: bool = False) -> None:
        self.send(*(Data(seq, f"reading {seq}".encode(), resend) for seq in seqs))
        assert [await self.recv() for _ in seqs] == [Ack(seq) for seq in seqs]

    async def close(self) -> None:
        self.send(Close(1000, "rebooting"))
        assert await self.recv_until_closed() == [Close(1000, "")]
        self.writer.close()


@contextlib.asynccontextmanager
async def gateway(
    state_dir: Path, agent: type[Agent] = Logger
) -> AsyncIterator[tuple[AgentRuntime, int]]:
    runtime = AgentRuntime(AgentSettings(state_dir=state_dir), {"thermostat": agent})
    await runtime.start()
    settings = TcpSettings(host="127.0.0.1", port=0, agent_class="thermostat", secrets=SECRETS)
    listener = TcpListener(settings, runtime)
    await listener.start()
    try:
        yield runtime, listener.bound_port
    finally:
        await listener.stop(drain_timeout_s=2.0)
        await runtime.drain(timeout_s=2.0)
        await runtime.close()


def readings(*seqs: int) -> list[str]:
    return [f"reading {seq}" for seq in seqs]


async def test_reboot_with_a_gap_resumes_at_resume_seq_and_the_jump_survives_a_restart(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path / "state") as (runtime, port):
        # The device reserved 1..10 in flash; 1..5 are applied when it reboots.
        device = await Device.connect_hello(port)
        await device.send_and_ack(1, 2, 3, 4, 5)
        await device.close()

        # After the reboot it holds nothing and its next block starts at 11.
        device = await Device.connect_hello(port, resume_seq=11)
        await device.send_and_ack(11, 12)
        await device.close()
        # Had the ACK of 12 been lost, 12 comes again: acknowledged, not applied twice.
        device = await Device.connect_hello(port, resume_seq=12)
        await device.send_and_ack(12, resend=True)
        await device.close()
        assert await runtime.call("thermostat", "thermo-42", "readings") == readings(
            1, 2, 3, 4, 5, 11, 12
        )

    # The jump was committed with seq 11: after a gateway restart, 13 follows on from 12 even
    # from firmware that does not send resume_seq, and 6..10 stay skipped.
    async with gateway(tmp_path / "state") as (runtime, port):
        device = await Device.connect_hello(port)
        await device.send_and_ack(13)
        await device.close()
        device = await Device.connect_hello(port)
        device.send(Data(6, b"reading 6"))  # below the last applied: a retransmission
        assert await device.recv() == Ack(6)
        await device.close()
        assert await runtime.call("thermostat", "thermo-42", "readings") == readings(
            1, 2, 3, 4, 5, 11, 12, 13
        )


async def test_without_resume_seq_a_gap_is_not_applied_and_stays_retryable(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path / "state") as (runtime, port):
        device = await Device.connect_hello(port)
        await device.send_and_ack(1, 2)
        await device.close()

        device = await Device.connect_hello(port)  # old firmware: no resume_seq
        device.send(Data(11, b"reading 11"))
        frames = await device.recv_until_closed()
        assert frames[0] == Error(
            ErrorCode.NOT_APPLIED, "not applied; retransmit after reconnecting", 11
        )
        assert frames[-1].code == ErrorCode.NOT_APPLIED
        # The same device, now announcing where it resumes, gets through.
        device = await Device.connect_hello(port, resume_seq=11)
        await device.send_and_ack(11)
        await device.close()
        assert await runtime.call("thermostat", "thermo-42", "readings") == readings(1, 2, 11)


async def test_resume_seq_keeps_order_when_a_resumed_frame_fails(tmp_path: Path) -> None:
    """resume_seq skips only the seqs below it: a frame at or above it that failed still holds
    back the later ones (no frame is skipped by accident)."""

    class Flaky(Logger):
        failed_once = False

        def on_message(self, conn, message) -> None:
            if message == b"reading 21" and not Flaky.failed_once:
                Flaky.failed_once = True
                raise RuntimeError("sensor glitch")
            super().on_message(conn, message)

    async with gateway(tmp_path / "state", Flaky) as (runtime, port):
        device = await Device.connect_hello(port)
        await device.send_and_ack(1)
        await device.close()
        device = await Device.connect_hello(port, resume_seq=20)
        await device.send_and_ack(20)
        device.send(Data(21, b"reading 21"), Data(22, b"reading 22"))
        frames = await device.recv_until_closed()
        assert Ack(21) not in frames and Ack(22) not in frames
        device = await Device.connect_hello(port, resume_seq=21)
        await device.send_and_ack(21, 22, resend=True)
        await device.close()
        assert await runtime.call("thermostat", "thermo-42", "readings") == readings(1, 20, 21, 22)
