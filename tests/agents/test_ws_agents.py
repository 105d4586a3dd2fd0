"""End to end: real WebSocket clients on one agent — a JSON dashboard and a binary device —
each receives exactly what it should, before and after the agent hibernates."""

from __future__ import annotations

import asyncio
import json
from typing import ClassVar

import pytest
from websockets.asyncio.client import connect

from gatewayd.agents import Agent, callable
from protocols.ws import WsListener, WsSettings
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


class Sensor(Agent):
    initial_state: ClassVar[dict] = {"last": None, "count": 0}

    def should_send_protocol_messages(self, conn, ctx):
        return "role=device" not in ctx["path"]  # devices speak binary only

    def on_message(self, conn, message):
        if isinstance(message, bytes):
            self.set_state({"last": message[0], "count": self.state["count"] + 1})
            conn.send(b"\x06" + message[:1])  # binary ack to the device
        else:
            conn.send("text:" + message)

    @callable
    def poke(self, value):
        for device in self.get_connections():
            if not device.protocol_enabled:
                device.send(bytes([value]))
        return "poked"

    @callable
    def boom(self):
        raise ValueError("no such thing")


async def recv_json(client, timeout_s=2.0):
    return json.loads(await asyncio.wait_for(client.recv(), timeout_s))


async def assert_nothing_else_before_a_poke(dash, device, rpc_id):
    """A barrier instead of a silence: the device's next message must be this poke's byte, so
    anything else sent to it (a JSON protocol frame) would be seen first."""
    await dash.send(json.dumps({"type": "gw.rpc", "id": rpc_id, "method": "poke", "args": [9]}))
    assert await asyncio.wait_for(device.recv(), 10) == b"\x09"
    assert (await recv_json(dash))["result"] == "poked"


async def test_dashboard_and_binary_device_across_hibernation(make_runtime):
    async with make_runtime({"sensor": Sensor}, hibernate_after_s=0.2) as rt:
        listener = WsListener(WsSettings(port=0), rt)
        await listener.start()
        base = f"ws://127.0.0.1:{listener.bound_port}/agents/sensor/room%201"
        try:
            async with connect(base) as dash, connect(base + "?role=device") as device:
                assert (await recv_json(dash))["type"] == "gw.identity"
                first = await recv_json(dash)
                assert first == {"type": "gw.state", "state": {"last": None, "count": 0}}

                for round_ in range(2):
                    await device.send(bytes([40 + round_]))
                    assert await device.recv() == bytes([6, 40 + round_])
                    state = await recv_json(dash)
                    assert state["type"] == "gw.state" and state["state"]["last"] == 40 + round_

                    await dash.send(
                        json.dumps({"type": "gw.rpc", "id": round_, "method": "poke", "args": [7]})
                    )
                    assert await device.recv() == b"\x07"
                    reply = await recv_json(dash)
                    assert reply == {
                        "type": "gw.rpc_result",
                        "id": str(round_),
                        "ok": True,
                        "done": True,
                        "result": "poked",
                    }

                    await dash.send(json.dumps({"type": "gw.rpc", "id": "e", "method": "boom"}))
                    error = await recv_json(dash)
                    assert not error["ok"] and "no such thing" in error["error"]
                    await dash.send("{not json")
                    assert await dash.recv() == "text:{not json"

                    # never a JSON protocol frame
                    await assert_nothing_else_before_a_poke(dash, device, f"barrier{round_}")
                    if round_ == 0:
                        await wait_until(
                            lambda: not rt.is_awake("sensor", "room 1"), 10, "the hibernation"
                        )
                assert rt.stats()["hibernations_total"] >= 1
                assert await rt.get_agent_state("sensor", "room 1") == {"last": 41, "count": 2}
        finally:
            await listener.stop()
        await wait_until(lambda: rt.stats()["connections_open"] == 0, 5, "the links to close")
