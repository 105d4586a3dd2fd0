"""Clients of a group reach an agent whichever member they reach (real NATS cluster, real
member processes, real WebSocket and HTTP sockets): a WebSocket client on a member that does
not own the agent is relayed to its owner, an MCP call through such a member is forwarded to
the owner over NATS, and clients follow the agent when its owner is killed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from gatewayd.agents.storage import agent_db_file
from gatewayd.client import AgentClient
from gatewayd.cluster.naming import partition_of, preferred_owner
from tests.cluster.group import API_TOKEN, Group, Member, addresses, wait_settled
from tests.cluster.nats_cluster import NATS_BIN
from tests.mcp.conftest import mcp_client
from tests.waiting import eventually, wait_until

CLASS = "tally"
EXTRA = f'[agents.classes.{CLASS}]\nclass = "tests.cluster.routing_agents:Tally"\n'


class _Token:  # what tests.mcp.conftest.mcp_client needs of a token
    secret = API_TOKEN


def _agent_owned_by(owner: str, members: list[str], partitions: int, prefix: str) -> str:
    """An agent id whose partition `owner` serves once the group settled on `members`."""
    for index in range(1000):
        agent = f"{prefix}{index}"
        if preferred_owner(partition_of(agent, partitions), members) == owner:
            return agent
    raise AssertionError(f"no agent id lands on {owner}")


def _start(group: Group, names: list[str]) -> None:
    """The NATS cluster, then the members, started together (each process takes seconds)."""
    if not Path(NATS_BIN).exists():
        pytest.fail(f"nats-server not found at {NATS_BIN}: run scripts/setup")
    group.start_nats()
    for name in names:
        group.members[name] = Member(group, name)
        group.members[name].process.start(wait_ready=False)
    for name in names:
        group.members[name].notify.wait_for("READY", "1", timeout_s=30)


async def _settled(group: Group, nc: nats.NATS, members: set[str]) -> dict[str, dict[str, str]]:
    """Wait until `members` serve their preferred partitions and advertise their addresses."""
    await wait_settled(nc, group.partitions, members, timeout_s=30)
    found: dict[str, dict[str, str]] = {}

    async def advertised() -> bool:
        found.update(await addresses(nc))
        return all({"ws", "api"} <= set(found.get(name, {})) for name in members)

    await eventually(advertised, bool, 15, "members' advertised addresses")
    return found


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    """Members m1 and m2 serving WebSocket and the HTTP API (shared by the tests that do
    not change the group)."""
    group = Group(tmp_path_factory.mktemp("routing"), clients=True, extra_config=EXTRA)
    try:
        _start(group, ["m1", "m2"])
        yield group
    finally:
        group.stop()


@pytest.fixture
async def pair_nc(pair: Group) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(servers=pair.urls, max_reconnect_attempts=-1)
    try:
        yield client
    finally:
        await client.close()


def _is(**wanted: Any) -> Any:
    return lambda state: (
        isinstance(state, dict) and all(state.get(k) == v for k, v in wanted.items())
    )


async def test_a_websocket_client_connected_to_the_wrong_member_reaches_the_agent(
    pair: Group, pair_nc: nats.NATS
) -> None:
    urls = await _settled(pair, pair_nc, {"m1", "m2"})
    agent = _agent_owned_by("m2", ["m1", "m2"], pair.partitions, "ws")
    owner_pid = pair.members["m2"].pid
    async with (
        AgentClient(urls["m1"]["ws"], CLASS, agent) as via_m1,
        AgentClient(urls["m2"]["ws"], CLASS, agent) as at_owner,
    ):
        echoes: list[str | bytes] = []
        via_m1.on_message(echoes.append)
        await via_m1.send_message("hello")
        # The owner ran the turn; the relayed client gets the state sync and the echo.
        state = await via_m1.wait_for_state(_is(last="hello"), 10)
        assert state["pid"] == owner_pid and state["count"] == 1
        await wait_until(lambda: echoes == ["echo:hello"], 5, "the echo through the relay")
        # One agent: the owner's own client sees the same state, and a state set through
        # the relay is the owner's state.
        await at_owner.wait_for_state(_is(last="hello", count=1), 5)
        await via_m1.set_state({**state, "note": "set through m1"})
        await at_owner.wait_for_state(_is(note="set through m1"), 5)
        await at_owner.send_message("again")
        await via_m1.wait_for_state(_is(last="again", count=2, note="set through m1"), 5)
    # The member that does not own the agent holds no copy of it.
    m1_state = pair.members["m1"].dir / "state" / "cluster"
    assert not Path(agent_db_file(str(m1_state), CLASS, agent)).exists()
    assert Path(agent_db_file(str(pair.members["m2"].dir / "state" / "cluster"), CLASS, agent))
    assert "relay" not in pair.members["m1"].log_text()  # no relay failed


async def test_an_mcp_call_through_the_wrong_member_runs_on_the_owner(
    pair: Group, pair_nc: nats.NATS
) -> None:
    urls = await _settled(pair, pair_nc, {"m1", "m2"})
    agent = _agent_owned_by("m2", ["m1", "m2"], pair.partitions, "rpc")
    owner_pid = pair.members["m2"].pid

    async def add(member: str, n: int) -> Any:
        async with mcp_client(f"{urls[member]['api']}/mcp", _Token()) as client:  # type: ignore[arg-type]
            result = await client.call_tool(
                "agent_call",
                {"agent_class": CLASS, "agent_id": agent, "method": "add", "args": {"n": n}},
            )
        assert not result.is_error, result
        return result.structured_content

    assert await add("m1", 5) == {"total": 5, "pid": owner_pid}  # forwarded to m2
    assert await add("m2", 2) == {"total": 7, "pid": owner_pid}  # m2's own call: same agent
    assert await add("m1", 1) == {"total": 8, "pid": owner_pid}
    async with mcp_client(f"{urls['m1']['api']}/mcp", _Token()) as client:  # type: ignore[arg-type]
        failed = await client.call_tool(
            "agent_call",
            {"agent_class": CLASS, "agent_id": agent, "method": "add", "args": {"n": "x"}},
        )
    assert failed.is_error  # the owner's error comes back, named
    assert "TypeError" in json.dumps([c.model_dump() for c in failed.content])


async def test_clients_follow_the_agent_when_its_owner_is_killed(tmp_path: Path) -> None:
    group = Group(tmp_path, clients=True, extra_config=EXTRA, lease_s=2.0, heartbeat_s=0.5)
    try:
        _start(group, ["m1", "m2"])
        nc = await nats.connect(servers=group.urls, max_reconnect_attempts=-1)
        try:
            urls = await _settled(group, nc, {"m1", "m2"})
            agent = _agent_owned_by("m2", ["m1", "m2"], group.partitions, "move")
            pids = {name: member.pid for name, member in group.members.items()}
            async with (
                # Straight to the owner, with the other member as the next URL to try.
                AgentClient([urls["m2"]["ws"], urls["m1"]["ws"]], CLASS, agent) as direct,
                # Relayed by m1.
                AgentClient(urls["m1"]["ws"], CLASS, agent) as relayed,
            ):
                await direct.send_message("before")
                await relayed.wait_for_state(_is(last="before", pid=pids["m2"]), 10)
                group.members["m2"].process.kill()
                # Both end up on m1 (the new owner) once it took the partition, with the state
                # the killed owner committed.
                for client in (direct, relayed):
                    await wait_until(
                        lambda c=client: c.connects >= 2 and c.connected, 20, "a reconnect"
                    )
                await eventually(
                    lambda: _send_when_connected(relayed, "after"),
                    bool,
                    20,
                    "a message through the relayed client",
                )
                state = await direct.wait_for_state(_is(last="after", pid=pids["m1"]), 20)
                assert state["count"] >= 2  # "before" survived the owner's death
                assert direct.url.startswith(urls["m1"]["ws"])
        finally:
            await nc.close()
    finally:
        group.stop()


async def _send_when_connected(client: AgentClient, message: str) -> bool:
    if not client.connected:
        return False
    try:
        await client.send_message(message)
    except Exception:
        return False
    return True
