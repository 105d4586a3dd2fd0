"""Replies and ACKs of one commit leave together: with the real agent runtime, an agent that
answers every DATA frame, and a real socket, the PUSH and the ACK arrive in one write."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gatewayd.agents import Agent, AgentRuntime, AgentSettings
from protocols.frames import Ack, Data, FrameDecoder, Hello, HelloOk, Push
from protocols.tcp import TcpListener, TcpSettings
from tests.frame_device import FrameDevice

pytestmark = pytest.mark.timeout(60)

SECRETS = {"dev-a": "secret-a"}


class Echo(Agent):
    def on_message(self, conn, message) -> None:  # type: ignore[no-untyped-def]
        self.set_state({"last": bytes(message).decode()})
        conn.send(b"re:" + bytes(message))


async def test_the_reply_and_the_ack_of_one_commit_leave_in_one_write(tmp_path: Path) -> None:
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path), {"thermostat": Echo})
    await runtime.start()
    settings = TcpSettings(host="127.0.0.1", port=0, agent_class="thermostat", secrets=SECRETS)
    listener = TcpListener(settings, runtime)
    await listener.start()
    try:
        device = await FrameDevice.connect(listener.bound_port)
        device.send(Hello("dev-a", SECRETS["dev-a"]))
        assert isinstance(await device.recv(), HelloOk)
        for seq in range(1, 6):  # paced: one frame, then its answer, then the next
            device.send(Data(seq, b"m%d" % seq))
            # One read: a write is one loopback segment, so the frames of one write come in
            # one read; the ACK and the PUSH written apart would come in two.
            chunk = await asyncio.wait_for(device.reader.read(65536), 5)
            frames = FrameDecoder().feed(chunk)
            assert [type(f) for f in frames] == [Push, Ack], frames
            push, ack = frames
            assert isinstance(push, Push) and push.payload == b"re:m%d" % seq
            assert ack == Ack(seq)
            device.send(Ack(push.seq))
        await device.close()
    finally:
        await listener.stop(drain_timeout_s=2.0)
        await runtime.close()
