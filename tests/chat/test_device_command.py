"""A command to an MQTT device as a chat tool, through the device agent's durable outbox:
real Mosquitto, the real MQTT bridge and runtime, a real device client; approval first."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import ClassVar

import aiomqtt
import pytest

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.chat import ChatAgent, DeviceCommand, ScriptedBackend
from protocols.mqtt import MqttBridge
from protocols.ws import WsListener, WsSettings
from tests.agents.outbox_gateway import Echo, settings
from tests.brokers import MosquittoBroker
from tests.chat.conftest import Served, user

pytestmark = pytest.mark.timeout(90)

MODE = {
    "type": "object",
    "properties": {"mode": {"enum": ["eco", "comfort"]}},
    "required": ["mode"],
}


class Boiler(ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])
    devices = (
        DeviceCommand("boiler_mode", "Set the boiler's mode.", "echo", "d1", MODE),
        DeviceCommand("cellar_mode", "Set the cellar boiler's mode.", "echo", "d9", MODE),
    )


def call(call_id: str, name: str, **args: object) -> dict:
    return {"type": "tool-call", "toolCallId": call_id, "toolName": name, "input": args}


async def test_an_approved_command_reaches_the_mqtt_device_and_an_offline_one_is_an_error(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    Boiler.backend = ScriptedBackend(
        replies=[
            [call("c1", "boiler_mode", mode="eco"), call("c2", "cellar_mode", mode="eco")],
            [{"type": "text-delta", "id": "t0", "delta": "Eco mode set."}],
        ]
    )
    runtime = AgentRuntime(
        AgentSettings(state_dir=tmp_path / "state"), {"chat": Boiler, "echo": Echo}
    )
    await runtime.start()
    bridge = MqttBridge(settings(mosquitto.url), runtime)
    listener = WsListener(WsSettings(port=0), runtime)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    await listener.start()
    served = Served(runtime, listener)
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
            await device.subscribe("devices/d1/cmd", qos=1)
            await device.publish("devices/d1/telemetry", b"hello", qos=1)  # its link opens
            messages = device.messages
            first = await asyncio.wait_for(anext(messages), 10)
            assert first.payload == b"echo:hello"
            async with served.client("chat", "b1") as a:
                await a.send("gw.chat.send", id="r1", messages=[user("u1", "eco mode")])
                done = (await a.until_type("gw.chat.done"))[-1]
                assert [w["toolCallId"] for w in done["waiting"]] == ["c1", "c2"]
                await a.send("gw.chat.tool_approval", id="a1", toolCallId="c1", approved=True)
                await a.until_type("gw.chat.message_updated")
                await a.send("gw.chat.tool_approval", id="a2", toolCallId="c2", approved=True)
                frames = await a.until(lambda f: f["type"] == "gw.chat.done")
                chunks = [f["chunk"] for f in frames if f["type"] == "gw.chat.chunk"]
                result, error = chunks[1], chunks[2]
                assert result["type"] == "tool-result" and result["output"]["sent"] is True
                assert (
                    error["type"] == "tool-error"
                    and "has no open mqtt/tcp link" in error["errorText"]
                )
            command = await asyncio.wait_for(anext(messages), 10)
            assert command.topic.value == "devices/d1/cmd"
            assert json.loads(command.payload) == {"command": "boiler_mode", "mode": "eco"}
    finally:
        await listener.stop()
        await bridge.stop(drain_timeout_s=5)
        await runtime.drain(5)
        await runtime.close()
