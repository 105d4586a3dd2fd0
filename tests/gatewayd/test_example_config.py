"""The shipped config.example.toml, run as the quick start runs it, answers the README's examples:
an MQTT device (`mosquitto_pub`-style JSON bytes), a binary TCP device (CBOR), a dashboard."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import cbor2
import pytest
from websockets.asyncio.client import connect as ws_connect

from protocols.frames import Data, Push, encode
from tests.brokers import MosquittoBroker, free_port
from tests.engine.generate.tiny_llama import write_tiny_llama
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.devices import TcpDevice
from tests.gatewayd.notify import NotifySocket


class ExampleSite:
    def __init__(self, tmp_path: Path, broker: MosquittoBroker) -> None:
        self.ws_port, self.tcp_port = free_port(), free_port()
        text = (REPO / "config.example.toml").read_text()
        text = text.replace('"127.0.0.1:8765"', f'"127.0.0.1:{self.ws_port}"')
        text = text.replace('"127.0.0.1:7878"', f'"127.0.0.1:{self.tcp_port}"')
        text = text.replace('"127.0.0.1:9184"', '"127.0.0.1:0"')
        text = text.replace('"127.0.0.1:8780"', '"127.0.0.1:0"')
        text = text.replace('"mqtt://127.0.0.1:1883"', f'"{broker.url}"')
        # [generators.smollm2] on the tiny random Llama (converted at start-up in a second):
        # the real SmolLM2 through this config is tests/generation/test_daemon.py's model test.
        tiny = write_tiny_llama(tmp_path / "tiny.gguf")
        text = text.replace('model = "smollm2"', f'gguf = "{tiny}"')
        text = re.sub(
            r'(secrets_file|tokens_file|path) = "([^"/][^"]*)"', rf'\1 = "{REPO}/\2"', text
        )
        config = tmp_path / "gatewayd.toml"
        config.write_text(text)
        self.notify = NotifySocket(tmp_path)
        self.gateway = GatewayProcess(config, self.notify)


@pytest.fixture
def example(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[ExampleSite]:
    site = ExampleSite(tmp_path, mosquitto)
    try:
        site.gateway.start()
        site.gateway.wait_log("mqtt: connected")
        yield site
    finally:
        try:
            assert site.gateway.stop() == 0
        finally:
            site.notify.close()


async def test_readme_examples_against_the_example_config(
    example: ExampleSite, mosquitto: MosquittoBroker
) -> None:
    url = f"ws://127.0.0.1:{example.ws_port}/agents/thermostat/thermo-1"
    async with ws_connect(url) as dashboard, aiomqtt.Client("127.0.0.1", mosquitto.port) as device:
        assert json.loads(await dashboard.recv())["type"] == "gw.identity"
        assert json.loads(await dashboard.recv())["state"]["temp"] is None
        await device.subscribe("devices/thermo-1/cmd", qos=1)

        # mosquitto_pub -q 1 -t devices/thermo-1/telemetry -m '{"temp": 19.0}'
        await device.publish("devices/thermo-1/telemetry", b'{"temp": 19.0}', qos=1)
        reply = await asyncio.wait_for(anext(aiter(device.messages)), 10)
        assert json.loads(reply.payload) == {"heating": True}
        state = json.loads(await dashboard.recv())["state"]
        assert state["temp"] == 19.0 and state["heating"] is True

        # The README's TCP device: HELLO with the example secret, one CBOR reading.
        tcp = TcpDevice(example.tcp_port, "thermo-1", "example-secret-1")
        await tcp.connect()
        tcp.writer.write(encode(Data(1, cbor2.dumps({"temp": 23.0}))))
        frames = [await tcp.next_frame(), await tcp.next_frame()]  # its ACK and the agent's PUSH
        push = next(f for f in frames if isinstance(f, Push))
        assert cbor2.loads(push.payload) == {"heating": False}
        tcp.writer.close()

        state = json.loads(await dashboard.recv())["state"]
        assert state["temp"] == 23.0 and state["readings"] == 2
