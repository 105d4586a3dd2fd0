"""The gateway's MCP server over real HTTP (the API server on uvicorn), with the SDK's own
client: tools listed and called (each call a turn of the agent), agent state read and
subscribed to on both protocol generations, tokens refused or limited, tool errors as MCP
error results."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError
from prometheus_client import REGISTRY

from tests.mcp.conftest import LAMPS_ONLY, NO_MCP, OPERATOR, READER, Gateway, mcp_client


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, types.TextContent))


async def test_tools_are_listed_discovery_first_and_a_call_is_a_turn_of_the_agent(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    async with mcp_client(gateway.url, OPERATOR) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert list(tools) == ["agent_classes_list", "agents_list", "agent_state_get",
                               "agent_call", "lamp_switch", "lamp_status", "meter_add"]  # fmt: skip
        switch = tools["lamp_switch"]
        assert switch.description == "Switch the lamp on or off."
        assert switch.input_schema["required"] == ["agent_id", "on"]
        assert switch.input_schema["properties"]["brightness"] == {
            "type": "integer", "default": 100, "description": "1..100 when on."
        }  # fmt: skip
        assert tools["lamp_status"].annotations.read_only_hint is True
        assert tools["lamp_switch"].annotations.read_only_hint is False

        calls_before = REGISTRY.get_sample_value(
            "gatewayd_mcp_tool_calls_total", {"tool": "lamp_switch", "outcome": "ok"}
        )
        with caplog.at_level(logging.INFO, logger="gatewayd.mcp.server"):
            result = await client.call_tool(
                "lamp_switch", {"agent_id": "hall", "on": True, "brightness": 40}
            )
        assert not result.is_error
        assert result.structured_content == {"on": True, "brightness": 40}
        assert json.loads(text_of(result)) == {"on": True, "brightness": 40}
        assert await gateway.runtime.get_agent_state("lamp", "hall") == {
            "on": True, "brightness": 40
        }  # fmt: skip
        assert "mcp: operator called lamp_switch: ok" in caplog.text
        assert (
            REGISTRY.get_sample_value(
                "gatewayd_mcp_tool_calls_total", {"tool": "lamp_switch", "outcome": "ok"}
            )
            == (calls_before or 0) + 1
        )

        # Discovery, then the generic call.
        listed = await client.call_tool("agents_list", {"agent_class": "lamp"})
        assert [a["agent_id"] for a in listed.structured_content["agents"]] == ["hall"]
        state = await client.call_tool(
            "agent_state_get", {"agent_class": "lamp", "agent_id": "hall"}
        )
        assert state.structured_content == {"on": True, "brightness": 40}
        added = await client.call_tool(
            "agent_call",
            {"agent_class": "meter", "agent_id": "m1", "method": "add", "args": {"kwh": 2.5}},
        )
        assert added.structured_content == {"result": 2.5}
        assert (
            await client.call_tool("meter_add", {"agent_id": "m1", "kwh": 1})
        ).structured_content == {"result": 3.5}
        classes = (await client.call_tool("agent_classes_list", {})).structured_content
        assert classes["result"][0] == {
            "agent_class": "lamp",
            "methods": ["factory_reset", "status", "switch"],
        }


async def test_tool_errors_are_mcp_error_results(gateway: Gateway) -> None:
    async with mcp_client(gateway.url, OPERATOR) as client:
        raised = await client.call_tool(
            "lamp_switch", {"agent_id": "hall", "on": True, "brightness": 500}
        )
        assert raised.is_error
        assert "ValueError: brightness must be 1..100, got 500" in text_of(raised)
        assert await gateway.runtime.get_agent_state("lamp", "hall") == {
            "on": False,
            "brightness": 0,
        }

        invalid = await client.call_tool("lamp_switch", {"agent_id": "hall", "on": "maybe"})
        assert invalid.is_error and "lamp_switch: invalid arguments: on:" in text_of(invalid)
        missing = await client.call_tool(
            "agent_state_get", {"agent_class": "lamp", "agent_id": "nobody"}
        )
        assert missing.is_error and "no agent lamp/'nobody'" in text_of(missing)
        with pytest.raises(MCPError, match="unknown tool 'lamp_explode'"):
            await client.call_tool("lamp_explode", {"agent_id": "hall"})


async def test_state_resources_read_and_notify_subscribers(gateway: Gateway) -> None:
    await gateway.runtime.call("lamp", "desk lamp/2", "switch", on=True, brightness=10)
    uri = "agent://lamp/desk%20lamp%2F2"
    async with mcp_client(gateway.url, OPERATOR) as client:
        listed = await client.list_resources()
        assert [str(r.uri) for r in listed.resources] == [uri]
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["agent://lamp/{id}", "agent://meter/{id}"]
        read = await client.read_resource(uri)
        assert json.loads(read.contents[0].text) == {"on": True, "brightness": 10}

        async with client.listen(resource_subscriptions=[uri]) as subscription:
            await client.call_tool("lamp_switch", {"agent_id": "desk lamp/2", "on": False})
            event = await asyncio.wait_for(anext(aiter(subscription)), 10)
            assert event.uri == uri
        read = await client.read_resource(uri, cache_mode="refresh")
        assert json.loads(read.contents[0].text) == {"on": False, "brightness": 0}


@pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed:Warning")
async def test_legacy_clients_subscribe_with_resources_subscribe(gateway: Gateway) -> None:
    updated: asyncio.Queue[str] = asyncio.Queue()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.put_nowait(str(message.params.uri))

    async with mcp_client(
        gateway.url, OPERATOR, mode="legacy", message_handler=on_message
    ) as client:
        assert client.server_capabilities.resources.subscribe is True
        await client.session.subscribe_resource("agent://lamp/porch")
        await gateway.runtime.call("lamp", "other", "switch", on=True)  # not subscribed
        await gateway.runtime.call("lamp", "porch", "switch", on=True, brightness=70)
        assert await asyncio.wait_for(updated.get(), 10) == "agent://lamp/porch"
        assert updated.empty()
        await client.session.unsubscribe_resource("agent://lamp/porch")


async def test_tokens_are_checked_before_any_mcp_and_limit_what_a_client_sees(
    gateway: Gateway,
) -> None:
    async with httpx.AsyncClient() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        missing = await http.post(gateway.url, json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_token"
        wrong = await http.post(
            gateway.url, json=body, headers={"Authorization": "Bearer nope-nope-nope"}
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid token"
        scope = await http.post(
            gateway.url, json=body, headers={"Authorization": f"Bearer {NO_MCP.secret}"}
        )
        assert scope.status_code == 403 and scope.json()["error"]["code"] == "scope_not_allowed"
    with pytest.raises(Exception):  # noqa: B017 the SDK client cannot even start
        async with mcp_client(gateway.url, None):
            pass

    await gateway.runtime.call("meter", "m1", "add", kwh=1.0)
    async with mcp_client(gateway.url, READER) as reader:
        names = [tool.name for tool in (await reader.list_tools()).tools]
        assert names == ["agent_classes_list", "agents_list", "agent_state_get", "lamp_status"]
        refused = await reader.call_tool("lamp_switch", {"agent_id": "hall", "on": True})
        assert refused.is_error
        assert text_of(refused) == (
            "token 'reader' is read-only: it cannot call lamp_switch, which changes things"
        )
        refused = await reader.call_tool(
            "agent_call", {"agent_class": "lamp", "agent_id": "hall", "method": "switch"}
        )
        assert refused.is_error and "read-only" in text_of(refused)
        assert not (await reader.call_tool("lamp_status", {"agent_id": "hall"})).is_error
    assert await gateway.runtime.get_agent_state("lamp", "hall") == {"on": False, "brightness": 0}

    async with mcp_client(gateway.url, LAMPS_ONLY) as lamps:
        names = [tool.name for tool in (await lamps.list_tools()).tools]
        assert "meter_add" not in names and "lamp_switch" in names
        with pytest.raises(MCPError, match="unknown tool 'meter_add'"):
            await lamps.call_tool("meter_add", {"agent_id": "m1", "kwh": 1})
        other = await lamps.call_tool("agent_state_get", {"agent_class": "meter", "agent_id": "m1"})
        assert other.is_error and text_of(other) == (
            "token 'lamps-only' may not reach agent class 'meter'"
        )
        listed = await lamps.call_tool("agents_list", {})
        assert [a["agent_class"] for a in listed.structured_content["agents"]] == ["lamp"]
        with pytest.raises(MCPError, match="may not reach agent class 'meter'"):
            await lamps.read_resource("agent://meter/m1")
        with pytest.raises(MCPError, match="may not reach agent class 'meter'"):
            async with lamps.listen(resource_subscriptions=["agent://meter/m1"]):
                pass
    assert await gateway.runtime.get_agent_state("meter", "m1") == {"kwh": 1.0}


async def test_a_session_belongs_to_the_token_that_opened_it(gateway: Gateway) -> None:
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "curl", "version": "0"}},
    }  # fmt: skip
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient() as http:
        opened = await http.post(
            gateway.url, json=initialize,
            headers={**accept, "Authorization": f"Bearer {OPERATOR.secret}"},
        )  # fmt: skip
        assert opened.status_code == 200
        session = opened.headers["mcp-session-id"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        session_headers = {
            **accept,
            "mcp-session-id": session,
            "mcp-protocol-version": "2025-06-18",
        }
        stolen = await http.post(
            gateway.url, json=listing,
            headers={**session_headers, "Authorization": f"Bearer {READER.secret}"},
        )  # fmt: skip
        assert stolen.status_code == 404
        own = await http.post(
            gateway.url, json=listing,
            headers={**session_headers, "Authorization": f"Bearer {OPERATOR.secret}"},
        )  # fmt: skip
        assert own.status_code == 200 and "lamp_switch" in own.text
