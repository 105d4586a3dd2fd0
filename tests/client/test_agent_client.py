"""The Python client against a real daemon: state sync between two clients, RPC with typed
errors, streaming, set_state (accepted and refused), and reconnecting after a restart."""

from __future__ import annotations

import asyncio
import json

import pytest

from gatewayd.client import (
    AgentClient,
    BadArgumentsError,
    ChatClient,
    ConnectionLostError,
    MethodNotFoundError,
    ProtocolError,
    RemoteError,
    StateRejectedError,
)
from tests.client.daemon import Gateway

WAIT_S = 10.0


async def test_two_clients_in_sync_rpc_typed_errors_streaming_and_set_state(
    gateway: Gateway,
) -> None:
    async with (
        AgentClient(gateway.ws_url, "thermostat", "room 1/a") as a,
        AgentClient(gateway.ws_url, "thermostat", "room 1/a") as b,
    ):
        assert a.identity["agent"] == "thermostat" and a.identity["id"] == "room 1/a"
        assert a.state["target"] == 21.0 == b.state["target"]
        seen: list[float] = []
        b.on_state(lambda state: seen.append(state["target"]))

        assert await a.call("set_target", 23.5) == 23.5
        await b.wait_for_state(lambda s: s["target"] == 23.5, WAIT_S)
        assert seen[-1] == 23.5 and a.state["target"] == 23.5

        with pytest.raises(MethodNotFoundError) as missing:
            await a.call("no_such_method")
        assert missing.value.remote_type == "RpcError" and "no_such_method" in str(missing.value)
        with pytest.raises(BadArgumentsError, match="set_target"):
            await a.call("set_target", 1, 2, 3)
        with pytest.raises(RemoteError) as refused:
            await a.call("set_target", 99)  # validate_state_change refuses 99 °C
        assert refused.value.remote_type == "StateRejectedError" and "5..30" in str(refused.value)

        # set_state: the other client sees it; a refused one is reverted and reported.
        errors: list[Exception] = []
        a.on_error(errors.append)
        await a.set_state({**a.state, "target": 19.0})
        await b.wait_for_state(lambda s: s["target"] == 19.0, WAIT_S)
        await a.set_state({**a.state, "target": 1000})
        assert a.state["target"] == 1000  # optimistic, until the gateway answers
        await a.wait_for_state(lambda s: s["target"] == 19.0, WAIT_S)
        assert len(errors) == 1 and isinstance(errors[0], StateRejectedError)
        assert "5..30" in str(errors[0])
        assert b.state["target"] == 19.0

        # A streaming call: every chunk, then the result; changes() as an async iterator.
        changes = a.changes()
        for temp in (20.0, 20.5, 21.0):
            await a.send_message(json.dumps({"temp": temp}))  # a reading, as a device sends it
        async with asyncio.timeout(WAIT_S):
            async for state in changes:
                if state["readings"] == 3:
                    break
        call = a.stream("history", 2)
        chunks = [chunk async for chunk in call]
        assert [c["temp"] for c in chunks] == [20.5, 21.0]
        assert await call.result() == 2

    with pytest.raises(ProtocolError, match="1008"):
        await AgentClient(gateway.ws_url, "no-such-class", "x").connect()


async def test_reconnects_after_a_daemon_restart_with_the_state_restored(
    gateway: Gateway,
) -> None:
    async with (
        AgentClient(
            gateway.ws_url, "thermostat", "t-restart", backoff_min_s=0.05, backoff_max_s=0.5
        ) as agent,
        ChatClient(gateway.ws_url, "chat", "c-restart", backoff_min_s=0.05) as chat,
    ):
        first = await chat.send("before the restart")
        assert await first.wait() == "complete"
        await agent.call("set_target", 24.0)
        pending = agent.stream("history", 1)  # answered before the stop
        await pending.result()

        await asyncio.to_thread(gateway.process.stop)
        with pytest.raises(ConnectionLostError):
            await agent.call("set_target", 25.0)  # nothing to talk to while it is down
        await asyncio.to_thread(gateway.process.start)

        await agent.wait_connected(WAIT_S)
        assert agent.connects == 2
        assert agent.state["target"] == 24.0  # sent again by the new process, from disk
        assert await agent.call("set_target", 22.0) == 22.0

        # The chat client came back too, with the stored conversation, and goes on.
        await chat.wait_connected(WAIT_S)
        second = await chat.send("after it")
        assert await second.wait() == "complete" and second.text == "echo: after it"
        texts = [m["parts"][0]["text"] for m in await chat.get_messages()]
        assert texts == [
            "before the restart",
            "echo: before the restart",
            "after it",
            "echo: after it",
        ]
