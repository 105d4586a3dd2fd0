"""The built-in tool groups, each enabled in [mcp] tool_groups, over real HTTP with the SDK's
client: devices (a command through the durable output path), schedules and queues (a dead
letter inspected and replayed), observability (metrics, recent errors by agent) and models (a
real onnxruntime inference)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest

from engine import Engine, ModelSpec
from tests.agents.conftest import MemoryLink
from tests.mcp.conftest import LAMPS_ONLY, OPERATOR, Gateway, mcp_client, serving
from tests.mcp.lamps import Lamp
from tests.mcp.polling import eventually

ALL_GROUPS = ["agents", "devices", "schedules", "observability", "models"]
MODEL = Path(__file__).resolve().parents[2] / "engine" / "models" / "anomaly.onnx"


@pytest.fixture
async def everything(tmp_path: Path) -> AsyncIterator[Gateway]:
    engine = Engine([ModelSpec("anomaly", MODEL, buckets=(1, 2))])
    await engine.start()
    try:
        mcp = {"tool_groups": ALL_GROUPS, "classes": {"meter": ["add"]}, "log_lines": 200}
        async with serving(tmp_path / "state", mcp, engine=engine) as running:
            yield running
    finally:
        await engine.close()


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, types.TextContent))


async def call(client: Any, name: str, **args: Any) -> Any:
    result = await client.call_tool(name, args)
    assert not result.is_error, text_of(result)
    return result.structured_content


async def test_every_group_is_listed_in_order_with_unique_names(everything: Gateway) -> None:
    async with mcp_client(everything.url, OPERATOR) as client:
        names = [tool.name for tool in (await client.list_tools()).tools]
    assert names == [
        "agent_classes_list", "agents_list", "agent_state_get", "agent_call",
        "devices_list", "device_last_seen", "device_command_send",
        "schedules_list", "schedule_cancel", "queue_list", "queue_item_cancel",
        "queue_dead_letter_replay", "mqtt_dead_letters_list", "mqtt_dead_letters_replay",
        "metrics_get", "errors_recent", "logs_recent",
        "models_list", "model_infer",
        "lamp_switch", "lamp_status", "meter_add",
    ]  # fmt: skip


async def test_devices_are_listed_and_commanded_through_the_durable_path(
    everything: Gateway,
) -> None:
    runtime = everything.runtime
    device = MemoryLink("lamp", "porch", transport="mqtt")
    await runtime.open_link(device, {})
    async with mcp_client(everything.url, OPERATOR) as client:
        devices = await call(client, "devices_list", agent_class="lamp")
        assert devices["devices"] == [
            {"agent_class": "lamp", "agent_id": "porch", "connection_id": device.link_id,
             "transport": "mqtt", "remote": device.remote, "tags": []}
        ]  # fmt: skip
        seen = await call(client, "device_last_seen", agent_class="lamp", agent_id="porch")
        assert seen["last_seen"] and seen["connections"][0]["connection_id"] == device.link_id

        sent = await call(
            client, "device_command_send", agent_class="lamp", agent_id="porch",
            command={"relay": True},
        )  # fmt: skip
        assert sent == {"sent_to": [device.link_id]}
        assert device.sent == ['{"relay": true}']  # released by the turn's commit

        await runtime.call("lamp", "attic", "status")
        nobody = await client.call_tool(
            "device_command_send", {"agent_class": "lamp", "agent_id": "attic", "command": "x"}
        )
        assert nobody.is_error and text_of(nobody) == "lamp/'attic' has no open connection"


async def test_schedules_and_a_dead_letter_inspected_and_replayed(everything: Gateway) -> None:
    runtime = everything.runtime
    Lamp.fuse_ok = False
    await runtime.run_in_agent("lamp", "hall", lambda lamp: lamp.schedule(3600, "status"))
    await runtime.run_in_agent(
        "lamp", "hall", lambda lamp: lamp.queue("replace_bulb", retry={"max_attempts": 1})
    )
    async with mcp_client(everything.url, OPERATOR) as client:
        (schedule,) = (await call(client, "schedules_list", agent_class="lamp", agent_id="hall"))[
            "schedules"
        ]
        assert schedule["method"] == "status" and schedule["kind"] == "delayed"
        await call(client, "schedule_cancel", agent_class="lamp", agent_id="hall",
                   schedule_id=schedule["id"])  # fmt: skip
        assert (await call(client, "schedules_list", agent_class="lamp", agent_id="hall")) == {
            "schedules": [], "truncated": False
        }  # fmt: skip

        async def dead() -> list[dict[str, Any]]:
            listed = await call(
                client, "queue_list", agent_class="lamp", agent_id="hall", status="dead"
            )
            return list(listed["items"])

        (item,) = await eventually(dead, lambda items: len(items) == 1, 20, "a dead letter")
        assert item["method"] == "replace_bulb" and "blew a fuse" in item["last_error"]
        errors = await call(client, "errors_recent", agent_class="lamp", agent_id="hall")
        assert any("blew a fuse" in line["message"] for line in errors["result"])

        Lamp.fuse_ok = True
        await call(client, "queue_dead_letter_replay", agent_class="lamp", agent_id="hall",
                   item_id=item["id"])  # fmt: skip

        async def bulb() -> Any:
            return await call(client, "agent_state_get", agent_class="lamp", agent_id="hall")

        await eventually(bulb, lambda state: state.get("bulb") == "new", 20, "the replayed job")
        assert await dead() == []
        letters = await call(client, "mqtt_dead_letters_list")
        assert letters == {"dead_letters": [], "truncated": False}

    async with mcp_client(everything.url, LAMPS_ONLY) as lamps:
        refused = await lamps.call_tool("mqtt_dead_letters_list", {})
        assert refused.is_error and "reaches only some agent classes" in text_of(refused)


async def test_metrics_and_models(everything: Gateway) -> None:
    await everything.runtime.call("lamp", "hall", "switch", on=True)
    async with mcp_client(everything.url, OPERATOR) as client:
        metrics = await call(client, "metrics_get", name_prefix="gatewayd_agent")
        assert metrics["samples"] and all(
            s["name"].startswith("gatewayd_agent") for s in metrics["samples"]
        )
        models = (await call(client, "models_list"))["models"]
        assert models == [{"name": "anomaly", "kind": "inference", "provider": "cpu",
                           "inputs": ["window: float32[N, 32]"],
                           "outputs": ["score: float32[N]", "reconstruction: float32[N, 32]"]}]  # fmt: skip
        result = await call(
            client, "model_infer", model="anomaly", inputs={"window": [[20.0] * 32]}
        )
        assert (
            len(result["outputs"]["score"]) == 1
            and len(result["outputs"]["reconstruction"][0]) == 32
        )
        wrong = await client.call_tool("model_infer", {"model": "anomaly", "inputs": {"temp": [1]}})
        assert wrong.is_error and "has no input temp (its inputs: window)" in text_of(wrong)
