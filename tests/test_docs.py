"""The docs say what the code does: PROTOCOL.md's example exchange is replayed against the
example agent over a real WebSocket, every config key the docs name exists, and the stated
agent-id limit is the enforced one."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.agents.storage import MAX_AGENT_ID_BYTES
from gatewayd.config import GatewayConfig, Section
from gatewayd.examples.thermostat import Thermostat
from protocols.ws import WsListener, WsSettings

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "protocols" / "PROTOCOL.md"
DOCS = [
    REPO / "README.md",
    PROTOCOL,
    REPO / "protocols" / "FRAMES.md",
    REPO / "gatewayd" / "agents" / "DURABILITY.md",
    REPO / "engine" / "ENGINE.md",
]
ANY = "..."  # the docs' `..` placeholder: any value


def protocol_example() -> list[tuple[str, dict[str, Any]]]:
    """PROTOCOL.md's example exchange: ("->" or "<-", frame) in order."""
    text = PROTOCOL.read_text(encoding="utf-8")
    block = text[text.index("Examples:") : text.index("RPC errors name")]
    frames = []
    for direction, body in re.findall(r"^\s+(->|<-) (\{.*\})", block, re.M):
        frames.append((direction, json.loads(body.replace(":..", f':"{ANY}"'))))
    assert frames, "PROTOCOL.md has an example exchange"
    return frames


def matches(documented: Any, real: Any) -> bool:
    """`real` has the documented shape: same keys, same lengths, equal values but for `ANY`."""
    if documented == ANY:
        return True
    if isinstance(documented, dict):
        return (
            isinstance(real, dict)
            and documented.keys() == real.keys()
            and all(matches(v, real[k]) for k, v in documented.items())
        )
    if isinstance(documented, list):
        return (
            isinstance(real, list)
            and len(documented) == len(real)
            and all(matches(d, r) for d, r in zip(documented, real, strict=True))
        )
    return bool(documented == real)


@pytest.fixture
async def example_agent_url(tmp_path: Path) -> AsyncIterator[str]:
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path), {"thermostat": Thermostat})
    await runtime.start()
    listener = WsListener(WsSettings(port=0), runtime)
    await listener.start()
    try:
        yield f"ws://127.0.0.1:{listener.bound_port}/agents/thermostat"
    finally:
        await listener.stop()
        await runtime.close()


async def _results(client: Any, rpc_id: str) -> list[dict[str, Any]]:
    """The gw.rpc_result frames of one call, up to and including its final one."""
    results: list[dict[str, Any]] = []
    while not results or not results[-1]["done"]:
        frame = json.loads(await asyncio.wait_for(client.recv(), 10))
        if frame["type"] == "gw.rpc_result" and frame["id"] == rpc_id:
            results.append(frame)
    return results


async def test_protocol_md_example_exchange_is_what_the_gateway_sends(
    example_agent_url: str,
) -> None:
    example = protocol_example()
    async with connect(f"{example_agent_url}/thermo-1") as client:
        for _ in range(2):  # gw.identity and gw.state
            await asyncio.wait_for(client.recv(), 10)
        for temp in (21.0, 21.5, 22.0):  # readings for the streaming `history` call
            await client.send(json.dumps({"temp": temp}))
            await asyncio.wait_for(client.recv(), 10)
        for index, (direction, frame) in enumerate(example):
            if direction != "->":
                continue
            documented = [f for d, f in example[index + 1 :] if d == "<-"]
            documented = [f for f in documented if f.get("id") == str(frame["id"])]
            await client.send(json.dumps(frame))
            real = await _results(client, str(frame["id"]))
            assert matches(documented[0], real[0]), (documented[0], real[0])
            assert matches(documented[-1], real[-1]), (documented[-1], real[-1])


def _config_key_exists(dotted: str) -> bool:
    model: Any = GatewayConfig
    parts = dotted.split(".")
    for position, part in enumerate(parts):
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        if part not in fields:
            return False
        annotation = fields[part].annotation
        if getattr(annotation, "__origin__", None) is dict:  # [models.NAME], [agents.classes.NAME]
            if position + 1 == len(parts):
                return True
            parts.pop(position + 1)
            annotation = annotation.__args__[1]
        if position + 1 == len(parts):
            return True
        if not (isinstance(annotation, type) and issubclass(annotation, Section)):
            return False
        model = annotation
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_config_key_the_docs_name_exists(doc: Path) -> None:
    tops = "|".join(GatewayConfig.model_fields)
    text = doc.read_text(encoding="utf-8")
    named = set(re.findall(rf"`((?:{tops})\.[a-z_][a-z0-9_.]*)`", text))
    named = {k for k in named if not k.endswith((".py", ".md", ".toml"))}  # file names
    assert sorted(k for k in named if not _config_key_exists(k)) == []


async def test_the_documented_agent_id_limit_is_enforced(example_agent_url: str) -> None:
    stated = re.search(r"1 to\s+(\d+) UTF-8 bytes once decoded", PROTOCOL.read_text())
    assert stated and int(stated.group(1)) == MAX_AGENT_ID_BYTES
    async with connect(f"{example_agent_url}/{'é' * (MAX_AGENT_ID_BYTES // 2)}") as client:
        assert json.loads(await asyncio.wait_for(client.recv(), 10))["type"] == "gw.identity"
    async with connect(f"{example_agent_url}/{'x' * (MAX_AGENT_ID_BYTES + 1)}") as client:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(client.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason.startswith("bad agent id:")
