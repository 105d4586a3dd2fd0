"""JSON protocol through the runtime: identity/state sync, suppression, readonly, RPC."""

from __future__ import annotations

import asyncio
import json
from typing import ClassVar

import pytest

from gatewayd.agents import Agent, ReadonlyConnectionError, RpcStream, callable
from protocols.link import Outcome
from tests.agents.conftest import MemoryLink

pytestmark = pytest.mark.timeout(60)


def rpc(rpc_id, method, *args, **kwargs) -> str:
    return json.dumps(
        {"type": "gw.rpc", "id": rpc_id, "method": method, "args": list(args), "kwargs": kwargs}
    )


class Panel(Agent):
    initial_state: ClassVar[dict] = {"setpoint": 20}
    changes: list = []  # noqa: RUF012

    def validate_state_change(self, new_state, source):
        if not isinstance(new_state, dict) or not 5 <= new_state.get("setpoint", 0) <= 30:
            raise ValueError("setpoint must be within 5..30")

    def on_state_changed(self, state, source):
        type(self).changes.append((state, source if isinstance(source, str) else "client"))
        raise RuntimeError("notification errors undo nothing")

    def should_connection_be_readonly(self, conn, ctx):
        return ctx.get("readonly", False)

    def on_message(self, conn, message):
        conn.send(b"echo:" + message if isinstance(message, bytes) else "echo:" + message)

    @callable
    def set_point(self, value):
        self.set_state({"setpoint": value})
        return value

    @callable
    async def add(self, a, b=0):
        await asyncio.sleep(0)
        return a + b

    @callable(streaming=True)
    def count_to(self, stream: RpcStream, n):
        for i in range(n):
            stream.send(i)
        return "done"

    @callable
    def unserialisable(self):
        return object()

    @callable
    def push_binary(self):
        self.broadcast(b"\x00\x01")


async def test_protocol_frames_for_json_clients_only(make_runtime):
    Panel.changes = []
    async with make_runtime({"p": Panel}) as rt:
        dash = MemoryLink("p", "1", transport="ws")
        other = MemoryLink("p", "1", transport="ws")
        device = MemoryLink("p", "1", transport="mqtt")  # default: protocol messages off
        for link in (dash, other, device):
            await rt.open_link(link, {})
        assert [f["type"] for f in dash.frames()] == ["gw.identity", "gw.state"]
        assert dash.frames("gw.identity")[0] == {
            "type": "gw.identity",
            "agent": "p",
            "id": "1",
            "connection": dash.link_id,
        }
        # A client state update: broadcast to the other JSON client, not echoed to the writer.
        sent = json.dumps({"type": "gw.set_state", "state": {"setpoint": 22}})
        assert await rt.submit_message(dash, sent) is Outcome.APPLIED
        assert [f["state"] for f in other.frames("gw.state")] == [
            {"setpoint": 20},
            {"setpoint": 22},
        ]
        assert [f["state"] for f in dash.frames("gw.state")] == [{"setpoint": 20}]
        # Validation failure: state_error to the writer only, nothing changes.
        await rt.submit_message(
            dash, json.dumps({"type": "gw.set_state", "state": {"setpoint": 99}})
        )
        assert "5..30" in dash.frames("gw.state_error")[0]["error"]
        assert await rt.get_agent_state("p", "1") == {"setpoint": 22}
        assert Panel.changes == [({"setpoint": 22}, "client")]
        # The device gets no protocol frames but RPC replies, direct sends and binary flow.
        await rt.submit_message(device, rpc("r1", "set_point", 25))
        await rt.submit_message(device, b"raw")
        await rt.submit_message(device, "plain text")
        await rt.submit_message(device, rpc("r2", "push_binary"))
        assert device.frames("gw.state") == [] and device.frames("gw.identity") == []
        assert device.frames("gw.rpc_result")[0] == {
            "type": "gw.rpc_result",
            "id": "r1",
            "ok": True,
            "done": True,
            "result": 25,
        }
        assert device.plain() == [b"echo:raw", "echo:plain text", b"\x00\x01"]
        assert dash.frames("gw.state")[-1]["state"] == {"setpoint": 25}


async def test_readonly_connections_cannot_change_state(make_runtime):
    async with make_runtime({"p": Panel}) as rt:
        viewer = MemoryLink("p", "ro")
        await rt.open_link(viewer, {"readonly": True})
        await rt.submit_message(
            viewer, json.dumps({"type": "gw.set_state", "state": {"setpoint": 10}})
        )
        assert viewer.frames("gw.state_error")[0]["error"] == "connection is read-only"
        with pytest.raises(ReadonlyConnectionError):
            await rt.submit_message(viewer, rpc(7, "set_point", 10))
        reply = viewer.frames("gw.rpc_result")[0]
        assert reply["id"] == "7" and not reply["ok"] and "read-only" in reply["error"]
        await rt.submit_message(viewer, rpc(8, "add", 1, 2))  # non-mutating RPC works
        assert viewer.frames("gw.rpc_result")[1]["result"] == 3
        assert await rt.get_agent_state("p", "ro") == {"setpoint": 20}


async def test_rpc_bad_input_gets_clear_errors(make_runtime):
    async with make_runtime({"p": Panel}) as rt:
        link = MemoryLink("p", "rpc")
        await rt.open_link(link, {})
        inputs = [
            rpc("a", "missing"),
            rpc("b", "on_message", 1, 2),
            rpc("c", "add"),
            rpc("d", "add", 1, 2, 3),
            rpc("e", "unserialisable"),
            rpc("f", "count_to", 3),
            rpc("g", "add", 1, b=4),
            '{"type": "gw.rpc", "id": "h"}',
            '{"type": "gw.nope"}',
            '{"type": "gw.rpc", "id": 1, "method": "add", "args": [1,',
            '{"temp": 21}',
        ]
        results = await asyncio.gather(
            *(rt.submit_message(link, text) for text in inputs), return_exceptions=True
        )
        failed = [i for i, r in enumerate(results) if r is not Outcome.APPLIED]
        assert failed == [0, 1, 2, 3, 4]  # failed turns: not acknowledged
        replies = {f["id"]: f for f in link.frames("gw.rpc_result") if f["done"]}
        assert "has no method 'missing'" in replies["a"]["error"]
        assert "not @callable" in replies["b"]["error"]
        assert (
            "bad arguments" in replies["c"]["error"]
            and "missing a required argument" in replies["c"]["error"]
        )
        assert "too many positional arguments" in replies["d"]["error"]
        assert "not JSON-serialisable" in replies["e"]["error"]
        assert replies["f"]["result"] == "done"
        chunks = [
            f["chunk"] for f in link.frames("gw.rpc_result") if f["id"] == "f" and not f["done"]
        ]
        assert chunks == [0, 1, 2]
        assert replies["g"]["result"] == 5
        assert "non-empty string 'method'" in replies["h"]["error"]
        errors = [f["error"] for f in link.frames("gw.error")]
        assert any("unknown protocol frame type 'gw.nope'" in e for e in errors)
        assert any("malformed JSON" in e for e in errors)
        assert link.plain() == ['echo:{"temp": 21}']  # user JSON passes through
        assert await rt.call("p", "rpc", "add", 2, 2) == 4  # agent still fine
