"""Clients of a group reach an agent whichever member they reach (real NATS cluster, real
member processes, real WebSocket, TCP, TLS and HTTP sockets): a WebSocket client or a TCP
device (plain, or TLS: relayed over TLS to the owner's TLS listener, never in plaintext) on a
member that does not own the agent is relayed to its owner, an MCP call through such a member
is forwarded to the owner over NATS, and clients and devices follow the agent when its owner
is killed and when it is handed over to a member that joins. MCP state reads, the schedules
tools and the chat messages route through such a member run on the owner too, and the
dashboard of any member lists the group's agents and devices."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import KeyValueConfig

from gatewayd.agents.storage import agent_db_file
from gatewayd.api.features import Feature
from gatewayd.api.server import build_app
from gatewayd.api.tokens import ApiToken, Tokens
from gatewayd.client import AgentClient
from gatewayd.cluster.forward import TcpRelay
from gatewayd.cluster.naming import partition_of, preferred_owner
from gatewayd.cluster.operations import OpenConnections
from gatewayd.cluster.ownership import PartitionRecord
from gatewayd.cluster.routing import Router, tcp_target
from gatewayd.cluster.rpc import RoutedRuntime, _reply, rpc_subject
from protocols.frames import Ack, Close, Data, ErrorCode, Hello, HelloOk, Push
from tests.certificates import self_signed
from tests.cluster.group import API_TOKEN, GROUP, Group, Member, addresses, wait_settled
from tests.cluster.routing_agents import Notes
from tests.frame_device import ConnectionClosed as DeviceClosed
from tests.frame_device import FrameDevice
from tests.mcp.conftest import mcp_client
from tests.waiting import eventually, wait_until

CLASS = "tally"
CHAT_CLASS = "notes"
SECRET = "device-secret-0123456789"
DEVICES = [f"dev{index}" for index in range(64)]  # the TCP devices the secrets file knows


def routing_config(work_dir: Path, tls: Path | None = None) -> str:
    """What the routing tests add to each member's config: the `Tally` agent class, and the
    TCP listener (a free port; the devices' secrets in `work_dir`; with `tls`, the
    certificate file, TLS with it and its key `<tls>.key`) serving it."""
    secrets = work_dir / "devices.toml"
    secrets.write_text("".join(f'"{device}" = "{SECRET}"\n' for device in DEVICES))
    secrets.chmod(0o600)
    listener_tls = (
        ""
        if tls is None
        else f'tls_cert_file = "{tls}"\ntls_key_file = "{tls.with_suffix(".key")}"\n'
    )
    return (
        f'[agents.classes.{CLASS}]\nclass = "tests.cluster.routing_agents:Tally"\n'
        f'[agents.classes.{CHAT_CLASS}]\nclass = "tests.cluster.routing_agents:Notes"\n'
        '[mcp]\ntool_groups = ["agents", "schedules", "devices"]\n'
        '[listeners.binary]\nenabled = true\nbind = "127.0.0.1:0"\n'
        f'agent_class = "{CLASS}"\nsecrets_file = "{secrets}"\n{listener_tls}'
    )


class _Token:  # what tests.mcp.conftest.mcp_client needs of a token
    secret = API_TOKEN


def _agent_owned_by(owner: str, members: list[str], partitions: int, prefix: str) -> str:
    """An agent id whose partition `owner` serves once the group settled on `members`."""
    return _agent_id(partitions, prefix, {owner: members})


def _agent_id(partitions: int, prefix: str, owners: dict[str, list[str]]) -> str:
    """An agent id whose partition each `owner` serves once the group settled on `members`
    (`owners`: {owner: members})."""
    for index in range(1000):
        agent = f"{prefix}{index}"
        number = partition_of(agent, partitions)
        if all(preferred_owner(number, members) == owner for owner, members in owners.items()):
            return agent
    raise AssertionError(f"no agent id lands on {owners}")


def _start(group: Group, names: list[str], cluster: str = "") -> None:
    """The NATS cluster, the first member (it creates the group's streams and buckets), then
    the others together (each process takes seconds to start); `cluster`: more `[cluster]`
    settings for each."""
    group.start_nats()
    _start_member(group, names[0], cluster=cluster)
    for name in names[1:]:
        _start_member(group, name, wait_ready=False, cluster=cluster)
    for name in names[1:]:
        group.members[name].notify.wait_for("READY", "1", timeout_s=30)


def _start_member(group: Group, name: str, *, wait_ready: bool = True, cluster: str = "") -> None:
    member = group.members[name] = Member(group, name)
    if cluster:
        config = member.config.read_text()
        member.config.write_text(config.replace("[cluster]\n", f"[cluster]\n{cluster}", 1))
    member.process.start(wait_ready=wait_ready)


Urls = dict[str, dict[str, str]]  # each member's advertised addresses by kind ("ws", "api", "tcp")


async def _settled(group: Group, nc: nats.NATS, members: set[str]) -> Urls:
    """Wait until `members` serve their preferred partitions and advertise their addresses."""
    await wait_settled(nc, group.partitions, members, timeout_s=30)
    found: Urls = {}

    def complete(kinds: set[str]) -> bool:
        return {"ws", "api"} <= kinds and bool(kinds & {"tcp", "tcp_tls"})

    async def advertised() -> bool:
        found.update(await addresses(nc))
        return all(complete(set(found.get(name, {}))) for name in members)

    await eventually(advertised, bool, 15, "members' advertised addresses")
    return found


@contextmanager
def _routing_group(work_dir: Path, *, tls: bool = False) -> Iterator[Group]:
    """Members m1 and m2 serving WebSocket, TCP (with `tls`: TLS with a self-signed
    certificate for 127.0.0.1, `work_dir/server.pem`, which is also the CA that members relay
    TLS devices with) and the HTTP API; stopped afterwards."""
    cert = self_signed(work_dir)[0] if tls else None
    group = Group(
        work_dir,
        clients=True,
        extra_config=routing_config(work_dir, cert),
        lease_s=2.0,
        heartbeat_s=0.5,
    )
    try:
        _start(group, ["m1", "m2"], "" if cert is None else f'relay_ca_file = "{cert}"\n')
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    """Two members shared by the tests that do not change the group; their TCP listeners
    use TLS (the group of `own_group` covers plain TCP)."""
    with _routing_group(tmp_path_factory.mktemp("routing"), tls=True) as group:
        yield group


@pytest.fixture
async def routed_nc(routed: Group) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(servers=routed.urls, max_reconnect_attempts=-1)
    try:
        yield client
    finally:
        await client.close()


def _alive(group: Group) -> list[str]:
    return sorted(
        name
        for name, member in group.members.items()
        if member.process.proc is not None and member.process.proc.poll() is None
    )


async def _split(group: Group, nc: nats.NATS, prefix: str) -> tuple[str, str, Urls, str]:
    """Once the two live members settled: the one that does not own the agent, its owner,
    their advertised addresses and the id (starting with `prefix`) of that agent."""
    other, owner = _alive(group)
    urls = await _settled(group, nc, {other, owner})
    return other, owner, urls, _agent_owned_by(owner, [other, owner], group.partitions, prefix)


def _db_file(group: Group, member: str, agent_class: str, agent_id: str) -> Path:
    """Where `member` would store the agent."""
    state = group.members[member].dir / "state" / "cluster"
    return Path(agent_db_file(str(state), agent_class, agent_id))


def _is(**wanted: Any) -> Any:
    return lambda state: (
        isinstance(state, dict) and all(state.get(k) == v for k, v in wanted.items())
    )


async def test_a_websocket_client_connected_to_the_wrong_member_reaches_the_agent(
    routed: Group, routed_nc: nats.NATS
) -> None:
    other, owner, urls, agent = await _split(routed, routed_nc, "ws")
    owner_pid = routed.members[owner].pid
    async with (
        AgentClient(urls[other]["ws"], CLASS, agent) as via_other,
        AgentClient(urls[owner]["ws"], CLASS, agent) as at_owner,
    ):
        echoes: list[str | bytes] = []
        via_other.on_message(echoes.append)
        await via_other.send_message("hello")
        # The owner ran the turn; the relayed client gets the state sync and the echo.
        state = await via_other.wait_for_state(_is(last="hello"), 10)
        assert state["pid"] == owner_pid and state["count"] == 1
        await wait_until(lambda: echoes == ["echo:hello"], 5, "the echo through the relay")
        # One agent: the owner's own client sees the same state, and a state set through
        # the relay is the owner's state.
        await at_owner.wait_for_state(_is(last="hello", count=1), 5)
        await via_other.set_state({**state, "note": "set through the relay"})
        await at_owner.wait_for_state(_is(note="set through the relay"), 5)
        await at_owner.send_message("again")
        await via_other.wait_for_state(_is(last="again", count=2, note="set through the relay"), 5)
    # The member that does not own the agent holds no copy of it.
    assert not _db_file(routed, other, CLASS, agent).exists()
    assert _db_file(routed, owner, CLASS, agent).exists()
    assert "relay to" not in routed.members[other].log_text()  # no relay failed


async def test_an_mcp_call_through_the_wrong_member_runs_on_the_owner(
    routed: Group, routed_nc: nats.NATS
) -> None:
    other, owner, urls, agent = await _split(routed, routed_nc, "rpc")
    owner_pid = routed.members[owner].pid

    async def add(member: str, n: Any) -> Any:
        ref = {"agent_class": CLASS, "agent_id": agent}
        return await _tool(urls[member]["api"], "agent_call", {**ref, "method": "add",
                                                              "args": {"n": n}})  # fmt: skip

    assert await add(other, 5) == {"total": 5, "pid": owner_pid}  # forwarded to the owner
    assert await add(owner, 2) == {"total": 7, "pid": owner_pid}  # the owner's own: same agent
    assert await add(other, 1) == {"total": 8, "pid": owner_pid}
    failed = await add(other, "x")
    assert not isinstance(failed, dict) and failed.is_error  # the owner's error, named
    assert "TypeError" in _text(failed)


async def _tool(url: str, name: str, arguments: dict[str, Any]) -> Any:
    """Call the MCP tool `name` at `url`; its structured result (or the failed result)."""
    async with mcp_client(f"{url}/mcp", _Token()) as client:  # type: ignore[arg-type]
        result = await client.call_tool(name, arguments)
    return result if result.is_error else result.structured_content


def _text(result: Any) -> str:
    return json.dumps([c.model_dump() for c in result.content])


async def test_state_and_schedules_read_through_the_wrong_member_are_the_owners(
    routed: Group, routed_nc: nats.NATS
) -> None:
    other, owner, urls, agent = await _split(routed, routed_nc, "sched")
    owner_pid = routed.members[owner].pid
    ref = {"agent_class": CLASS, "agent_id": agent}
    via = urls[other]["api"]

    # An agent nobody made yet: "no agent" on either member (asking does not create it).
    missing = await _tool(via, "agent_state_get", ref)
    assert missing.is_error and "no agent" in _text(missing)
    made = await _tool(via, "agent_call", {**ref, "method": "remind", "args": {"after_s": 3600}})
    assert made["pid"] == owner_pid  # made on the owner, through the other member
    await _tool(urls[owner]["api"], "agent_call", {**ref, "method": "add", "args": {"n": 2}})
    # The state the owner holds, read through the member that holds no copy of the agent.
    assert await _tool(via, "agent_state_get", ref) == {"total": 2, "pid": owner_pid}

    listed = await _tool(via, "schedules_list", ref)
    assert [(s["id"], s["method"]) for s in listed["schedules"]] == [(made["schedule_id"], "add")]
    cancelled = await _tool(via, "schedule_cancel", {**ref, "schedule_id": made["schedule_id"]})
    assert cancelled == {"cancelled": made["schedule_id"]}
    assert (await _tool(urls[owner]["api"], "schedules_list", ref))["schedules"] == []
    again = await _tool(via, "schedule_cancel", {**ref, "schedule_id": made["schedule_id"]})
    assert again.is_error and "has no schedule" in _text(again)  # the owner's answer
    assert (await _tool(via, "queue_list", ref)) == {"items": [], "truncated": False}
    assert not _db_file(routed, other, CLASS, agent).exists()


async def test_a_device_command_sent_through_the_wrong_member_reaches_the_owners_client(
    routed: Group, routed_nc: nats.NATS
) -> None:
    other, owner, urls, agent = await _split(routed, routed_nc, "cmd")
    ref = {"agent_class": CLASS, "agent_id": agent}
    async with AgentClient(urls[owner]["ws"], CLASS, agent) as device:
        got: list[str | bytes] = []
        device.on_message(got.append)
        await device.send_message("hello")  # the agent exists (stored) from this turn on
        await wait_until(lambda: got == ["echo:hello"], 5, "the echo")
        sent = await _tool(urls[other]["api"], "device_command_send", {**ref, "command": "blink"})
        assert isinstance(sent, dict) and len(sent["sent_to"]) == 1, sent
        await wait_until(lambda: got[-1:] == ["blink"], 5, "the command on the owner's client")


async def test_chat_messages_read_through_the_wrong_member_are_the_owners(
    routed: Group, routed_nc: nats.NATS
) -> None:
    other, owner, urls, agent = await _split(routed, routed_nc, "chat")
    ref = {"agent_class": CHAT_CLASS, "agent_id": agent}
    for text in ("first", "second"):
        await _tool(
            urls[owner]["api"], "agent_call", {**ref, "method": "note", "args": {"text": text}}
        )
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
        answer = await http.get(f"{urls[other]['api']}/agents/{CHAT_CLASS}/{agent}/messages")
        assert answer.status_code == 200, answer.text
        messages = answer.json()["messages"]
        assert [m["parts"][0]["text"] for m in messages] == ["first", "second"]
        # Written by the owner's process: the ids name its pid, not the relaying member's.
        assert all(m["id"].startswith(f"m{routed.members[owner].pid}-") for m in messages)
        newest = await http.get(
            f"{urls[other]['api']}/agents/{CHAT_CLASS}/{agent}/messages", params={"limit": 1}
        )
        assert [m["parts"][0]["text"] for m in newest.json()["messages"]] == ["second"]
    assert not _db_file(routed, other, CHAT_CLASS, agent).exists()


async def test_a_tls_device_connected_to_the_wrong_member_reaches_its_agent(
    routed: Group, routed_nc: nats.NATS
) -> None:
    """The member terminates the device's TLS, authenticates its HELLO and relays it over TLS
    to the owner's TLS listener (which speaks nothing else); the dashboard of the relaying
    member lists the device as connected on its owner."""
    other, owner, urls, device_id = await _split(routed, routed_nc, "dev")
    assert device_id in DEVICES
    assert "tcp" not in urls[owner]  # the owner has only its TLS listener
    port = int(urls[other]["tcp_tls"].rpartition(":")[2])
    trust = ssl.create_default_context(cafile=str(routed.work_dir / "server.pem"))
    device = await FrameDevice.connect(port, ssl=trust, server_hostname="localhost")
    try:
        device.send(Hello(device_id, SECRET))
        assert isinstance(await device.recv(), HelloOk)  # the owner's, through the relay
        device.send(Data(1, b"over tls"))
        frames = [await device.recv(), await device.recv()]
        assert Ack(1) in frames  # committed on the owner
        (push,) = [frame for frame in frames if isinstance(frame, Push)]
        assert push.payload == b"echo:over tls"  # the agent's reply, a durable push
        device.send(Ack(push.seq))
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
            listed = await http.get(f"{urls[other]['api']}/dashboard/api/devices")
        assert listed.status_code == 200, listed.text
        (row,) = [d for d in listed.json()["devices"] if d["id"] == device_id]
        assert (row["member"], row["connected"], row["transports"]) == (owner, True, ["tcp"])
        assert listed.json()["missing_members"] == []
    finally:
        await device.close()
    async with AgentClient(urls[owner]["ws"], CLASS, device_id) as at_owner:
        state = await at_owner.wait_for_state(_is(last="over tls"), 5)
    assert state["pid"] == routed.members[owner].pid
    assert not _db_file(routed, other, CLASS, device_id).exists()
    assert "relay to" not in routed.members[other].log_text()  # no relay failed


def test_a_tls_device_is_relayed_only_to_a_tls_listener() -> None:
    plain, tls = {"tcp": "10.0.0.2:7878"}, {"tcp_tls": "[fd00::2]:7879", "ws": "ws://x:1"}
    assert tcp_target(tls, tls=True) == ("fd00::2", 7879, True)
    assert tcp_target(plain, tls=True) is None  # never downgraded to plaintext
    assert tcp_target(plain, tls=False) == ("10.0.0.2", 7878, False)
    assert tcp_target(tls, tls=False) == ("fd00::2", 7879, True)  # upgraded: fine
    assert tcp_target({"tcp": "no-port"}, tls=False) is None


async def test_a_tls_relay_refuses_an_owner_whose_certificate_does_not_verify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`TcpRelay` over real sockets to a TLS echo server standing in for the owner's listener:
    with the CA that signed it the bytes flow both ways; with another CA the device gets the
    busy frame and the connection closes, and the warning names the setting to fix."""
    cert, key = self_signed(tmp_path)
    owner_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    owner_tls.load_cert_chain(cert, key)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    owner = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=owner_tls)
    owner_port = owner.sockets[0].getsockname()[1]
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    trusts = {
        "right": ssl.create_default_context(cafile=str(cert)),
        "wrong": ssl.create_default_context(cafile=str(self_signed(other_ca)[0])),
    }
    loop = asyncio.get_running_loop()
    relays = {
        name: await loop.create_server(
            lambda t=trust: TcpRelay("127.0.0.1", owner_port, b"hello ", b"BUSY", tls=t),
            "127.0.0.1",
            0,
        )
        for name, trust in trusts.items()
    }
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relays["right"].sockets[0].getsockname()[1]
        )
        writer.write(b"world")
        got = b""
        while got != b"hello world":
            got += await asyncio.wait_for(reader.read(1024), 5)
        writer.close()
        with caplog.at_level(logging.WARNING, logger="gatewayd.cluster.forward"):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", relays["wrong"].sockets[0].getsockname()[1]
            )
            assert await asyncio.wait_for(reader.read(), 5) == b"BUSY"  # then closed
            writer.close()
        assert "certificate verify failed" in caplog.text
        assert "relay_ca_file" in caplog.text
    finally:
        for server in (owner, *relays.values()):
            server.close()


async def test_a_member_retries_its_first_heartbeat_until_jetstream_takes_it(
    routed: Group, routed_nc: nats.NATS
) -> None:
    """A group of its own ("retry") on the module's NATS cluster, whose members bucket first
    refuses every heartbeat (records larger than it takes): the member logs each failure
    with its reason and retries with backoff, and starts once JetStream takes the write."""
    js = routed_nc.jetstream()
    await js.create_key_value(
        KeyValueConfig(bucket="GW_retry_MEMBERS", history=1, max_value_size=16, replicas=3)
    )
    member = _foreign_member(
        routed,
        "retry",
        '[cluster]\ningest_subject = "gw.retry_in"\nreply_subject = "gw.retry_out"\n',
    )
    try:
        await wait_until(
            lambda: "first heartbeat not confirmed (attempt 1)" in member.log_text(),
            15,
            "a failed first heartbeat",
        )
        assert "heartbeat failed:" in member.log_text()  # each failure, with its reason
        info = await js.stream_info("KV_GW_retry_MEMBERS")
        info.config.max_msg_size = -1
        await js.update_stream(info.config)
        member.notify.wait_for("READY", "1", timeout_s=15)
        assert "cannot join the group" not in member.log_text()
    finally:
        member.process.kill()  # the group "retry" is its own: nothing to hand over


def _foreign_member(group: Group, other_group: str, cluster: str = "[cluster]\n") -> Member:
    """Member "<other_group>1" of the group `other_group` on `group`'s NATS cluster, started
    without waiting for it to be ready; `cluster` replaces its config's `[cluster]` line. Not in
    `group.members`: the other tests never see it."""
    member = Member(group, f"{other_group}1")
    member.config.write_text(
        member.config.read_text()
        .replace(f'group = "{GROUP}"', f'group = "{other_group}"')
        .replace("[cluster]\n", cluster)
    )
    member.process.start(wait_ready=False)
    return member


async def test_a_second_group_capturing_the_same_subjects_stops_with_a_clear_reason(
    routed: Group,
) -> None:
    """Another group ("dup") on the same NATS cluster left with the first group's ingest
    subject: its member stops at start-up, naming the stream, the subjects and the settings
    to change, instead of retrying."""
    member = _foreign_member(routed, "dup")
    proc = member.process.proc
    assert proc is not None
    try:
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            member.process.kill()
    log = member.log_text()
    assert "cannot join the group" in log
    assert "stream GW_dup_IN cannot capture" in log
    assert "give each group its own [cluster] ingest_subject and reply_subject" in log


@pytest.fixture
def own_group(tmp_path: Path) -> Iterator[Group]:
    """Members m1 and m2 of a group of this test's own (it kills one and adds another)."""
    with _routing_group(tmp_path) as group:
        yield group


async def test_clients_follow_the_agent_when_its_owner_is_killed_and_when_it_moves(
    own_group: Group,
) -> None:
    nc = await nats.connect(servers=own_group.urls, max_reconnect_attempts=-1)
    try:
        await _follow(own_group, nc, survivor="m1", owner="m2", joiner="m3")
    finally:
        await nc.close()


async def _follow(group: Group, nc: nats.NATS, survivor: str, owner: str, joiner: str) -> None:
    urls = await _settled(group, nc, {survivor, owner})
    # On `owner` while it serves with `survivor`; on `joiner` once that joins `survivor`.
    agent = _agent_id(
        group.partitions, "move", {owner: [survivor, owner], joiner: [survivor, joiner]}
    )
    pids = {name: group.members[name].pid for name in (survivor, owner)}
    async with (
        # Straight to the owner, with the other member as the next URL to try.
        AgentClient([urls[owner]["ws"], urls[survivor]["ws"]], CLASS, agent) as direct,
        # Relayed by the other member.
        AgentClient(urls[survivor]["ws"], CLASS, agent) as relayed,
    ):
        await direct.send_message("before")
        await relayed.wait_for_state(_is(last="before", pid=pids[owner]), 10)

        # The owner is killed: both clients end up on the survivor (the new owner) once it
        # took the partition, with the state the killed owner committed.
        group.members[owner].process.kill()
        for client in (direct, relayed):
            await wait_until(lambda c=client: c.connects >= 2 and c.connected, 20, "a reconnect")
        await _deliver(relayed, "after the kill")
        state = await direct.wait_for_state(_is(last="after the kill", pid=pids[survivor]), 20)
        assert state["count"] >= 2  # "before" survived the owner's death
        assert direct.url.startswith(urls[survivor]["ws"])
        # A TCP device of an agent that moves the same way, on the survivor (its owner now).
        device_id = _agent_id(
            group.partitions, "dev", {owner: [survivor, owner], joiner: [survivor, joiner]}
        )
        survivor_tcp = int(urls[survivor]["tcp"].rpartition(":")[2])
        device = await _tcp_data(survivor_tcp, device_id, 1, b"tcp before the move")

        # A member joins and the partition is handed over to it: the survivor tells its
        # clients to reconnect, and relays them to the new owner.
        _start_member(group, joiner)
        urls = await _settled(group, nc, {survivor, joiner})
        for client in (direct, relayed):
            await wait_until(lambda c=client: c.connects >= 3 and c.connected, 20, "a reconnect")
        await _deliver(direct, "after the move")
        joiner_pid = group.members[joiner].pid
        state = await relayed.wait_for_state(_is(last="after the move", pid=joiner_pid), 20)
        assert state["count"] >= 3
        # The device was told to reconnect, and is relayed to the new owner when it does.
        try:
            closing = await device.recv(timeout_s=20)
        finally:
            await device.close()
        assert isinstance(closing, Close) and closing.code == ErrorCode.GOING_AWAY, closing
        device = await _tcp_data(survivor_tcp, device_id, 2, b"tcp after the move")
        await device.close()
    async with AgentClient(urls[joiner]["ws"], CLASS, device_id) as at_joiner:
        await at_joiner.wait_for_state(_is(last="tcp after the move", pid=joiner_pid), 10)


async def _tcp_data(port: int, device_id: str, seq: int, payload: bytes) -> FrameDevice:
    """A device connected to `port` whose DATA `seq` was acknowledged and whose echo it got
    (and acknowledged), retrying while a member refuses it because the agent moves."""

    async def attempt() -> FrameDevice | None:
        device = await FrameDevice.connect(port)
        try:
            device.send(Hello(device_id, SECRET))
            if not isinstance(await device.recv(), HelloOk):
                await device.close()
                return None  # ERROR SERVER_BUSY: the agent moves, reconnect
            device.send(Data(seq, payload))
            acked = echoed = False
            while not (acked and echoed):
                frame = await device.recv()
                acked = acked or frame == Ack(seq)
                if isinstance(frame, Push):
                    device.send(Ack(frame.seq))
                    echoed = echoed or frame.payload == b"echo:" + payload
            return device
        except (DeviceClosed, TimeoutError):
            await device.close()
            return None

    found = await eventually(attempt, lambda d: d is not None, 20, f"DATA {seq} acknowledged")
    assert isinstance(found, FrameDevice)
    return found


async def _deliver(client: AgentClient, message: str) -> None:
    """Send `message` once the client is connected (again)."""
    await eventually(
        lambda: _send_when_connected(client, message), bool, 20, f"sending {message!r}"
    )


async def _send_when_connected(client: AgentClient, message: str) -> bool:
    if not client.connected:
        return False
    try:
        await client.send_message(message)
    except Exception:
        return False
    return True


async def test_the_dashboard_served_by_the_wrong_member_shows_the_owners_agent(
    routed: Group, routed_nc: nats.NATS
) -> None:
    other, owner, urls, agent = await _split(routed, routed_nc, "dash")
    owner_pid = routed.members[owner].pid
    ref = {"agent_class": CLASS, "agent_id": agent}
    page = f"{urls[other]['api']}/dashboard/api"
    other_file = _db_file(routed, other, CLASS, agent)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
        # An agent nobody made yet: 404 through the other member, and no copy made there.
        unknown = await http.get(f"{page}/agent", params={"class": CLASS, "id": agent})
        assert unknown.status_code == 404, unknown.text
        made = await _tool(
            urls[owner]["api"], "agent_call", {**ref, "method": "remind", "args": {"after_s": 3600}}
        )
        await _tool(urls[owner]["api"], "agent_call", {**ref, "method": "add", "args": {"n": 3}})
        async with AgentClient(urls[owner]["ws"], CLASS, agent) as at_owner:
            await at_owner.wait_for_state(_is(total=3), 5)
            shown = await http.get(f"{page}/agent", params={"class": CLASS, "id": agent})
            assert shown.status_code == 200, shown.text
            detail = shown.json()
            # The owner's state, schedule and open connection, read through the other member.
            assert detail["state"] == {"total": 3, "pid": owner_pid}
            assert [s["id"] for s in detail["schedules"]] == [made["schedule_id"]]
            assert [c["transport"] for c in detail["connections"]] == ["ws"]
            assert detail["queue"] == [] and detail["dead_letters"] == []
        # Replaying goes to the owner too: its answer (no such dead letter) comes back.
        replay = await http.post(
            f"{page}/replay", json={"class": CLASS, "id": agent, "item": "nope"}
        )
        assert replay.status_code == 404 and "no dead letter" in replay.text
    assert not other_file.exists()  # the member serving the page holds no copy


async def test_agents_and_devices_listed_through_one_member_are_the_groups(
    routed: Group, routed_nc: nats.NATS
) -> None:
    first, second = _alive(routed)
    urls = await _settled(routed, routed_nc, {first, second})
    members = [first, second]
    agents = {
        owner: _agent_owned_by(owner, members, routed.partitions, "listed") for owner in members
    }
    for owner, agent in agents.items():  # each made through the member that does not own it
        via = urls[second if owner == first else first]["api"]
        await _tool(
            via, "agent_call", {"agent_class": CLASS, "agent_id": agent, "method": "add",
                                "args": {"n": 1}},
        )  # fmt: skip
    listed = await _tool(urls[first]["api"], "agents_list", {"id_contains": "listed"})
    assert listed["missing_members"] == []
    assert sorted((a["agent_id"], a["member"]) for a in listed["agents"]) == sorted(
        (agent, owner) for owner, agent in agents.items()
    )
    await _dashboard_lists_the_group(urls[first]["api"], agents, second)
    # A device connected to the second member, listed through the first.
    device = agents[second]
    async with AgentClient(urls[second]["ws"], CLASS, device) as client:
        await client.wait_for_state(_is(total=1), 5)
        devices = await _tool(urls[first]["api"], "devices_list", {"id_contains": device})
        assert [(d["agent_id"], d["transport"], d["member"]) for d in devices["devices"]] == [
            (device, "ws", second)
        ]
        assert devices["missing_members"] == []
        seen = await _tool(
            urls[first]["api"], "device_last_seen", {"agent_class": CLASS, "agent_id": device}
        )
        assert seen["last_seen"] is not None
        assert [(c["transport"], c["member"]) for c in seen["connections"]] == [("ws", second)]


async def _dashboard_lists_the_group(api: str, agents: dict[str, str], elsewhere: str) -> None:
    """The dashboard at `api` lists `agents` ({owner: agent id}) with their owners, searched
    in any case, and opens the page of the one `elsewhere` owns through the forwarded route.
    (The lists may be up to 2 s old: the member reuses the group's answer that long.)"""
    page = f"{api}/dashboard/api"
    expected = sorted((agent, owner) for owner, agent in agents.items())
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:

        async def listed(path: str, **params: str) -> Any:
            found = (await http.get(f"{page}/{path}", params=params)).json()
            rows = found["agents" if path == "agents" else "devices"]
            mine = sorted((r["id"], r["member"]) for r in rows if r["id"] in agents.values())
            return mine, found

        _, answer = await eventually(
            lambda: listed("agents", q="LISTED"), lambda r: r[0] == expected, 5, "the agents"
        )
        assert len(answer["agents"]) == len(agents)  # the search, in any case
        assert answer["missing_members"] == [] and answer["total"] >= len(agents)
        # The devices (of the TCP listener's class), with the member that serves each.
        _, devices = await eventually(
            lambda: listed("devices"), lambda r: r[0] == expected, 5, "the devices"
        )
        assert devices["missing_members"] == []
        # The list's link: the agent's page, read on its owner through this member.
        shown = await http.get(f"{page}/agent", params={"class": CLASS, "id": agents[elsewhere]})
        assert shown.status_code == 200, shown.text
        assert shown.json()["state"]["total"] == 1


class _Probe:
    """How a member that serves nothing sees the group (for a `RoutedRuntime` built in the
    test process, on the module's NATS): `alive` members, and every partition owned by
    `owner`. Only this view is made up; the members it asks are the group's real ones."""

    def __init__(self, nc: nats.NATS, partitions: int, alive: list[str], owner: str) -> None:
        self.name = "probe"
        self.nc = nc
        self.settings = SimpleNamespace(group=GROUP, partitions=partitions)
        self.partitions: dict[int, Any] = {}
        self.partition_moving: list[Any] = []
        self.ownership = SimpleNamespace(
            records={n: PartitionRecord(owner, 1, 1) for n in range(partitions)},
            alive=lambda: alive,
            member_info={},
        )


async def test_a_member_that_does_not_answer_is_named_and_an_unserved_agent_is_a_503(
    routed: Group, routed_nc: nats.NATS
) -> None:
    first, second = _alive(routed)
    await _settled(routed, routed_nc, {first, second})
    # "mute" is subscribed to its rpc subject but never answers; "ghost" has no subscriber.
    mute = await routed_nc.subscribe(rpc_subject(GROUP, "mute"))
    try:
        probe = _Probe(routed_nc, routed.partitions, [first, second, "ghost", "mute"], "ghost")
        local = SimpleNamespace(open_connections=list, classes={CHAT_CLASS: Notes})
        routed_runtime = RoutedRuntime(local, Router(probe), timeout_s=0.5)
        group = await routed_runtime.ask_members(OpenConnections([CLASS]), timeout_s=0.5)
        assert sorted(str(name) for name in group.answers) == sorted([first, second, "probe"])
        assert group.missing == {
            "ghost": "does not answer (no responder)",
            "mute": "no answer within 0.5s",
        }
        # The chat messages route of a member that finds no member serving the agent in time.
        token = ApiToken("ops", "ops-secret-0123456789")
        app, _ = build_app(
            SimpleNamespace(runtime=local, routed_runtime=routed_runtime),
            Tokens.of(token),
            [Feature("messages", "gatewayd.chat.http:routes")],
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://member"
        ) as http:
            answer = await http.get(
                f"/agents/{CHAT_CLASS}/nobody/messages",
                headers={"Authorization": f"Bearer {token.secret}"},
            )
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "2"
        error = answer.json()["error"]
        assert error["code"] == "agent_unavailable" and error["type"] == "server_error"
        assert f"{CHAT_CLASS}/nobody" in error["message"]
        assert "ghost does not answer" in error["message"]
    finally:
        await mute.unsubscribe()


async def test_an_answer_over_the_nats_payload_limit_is_refused_with_a_named_error(
    routed_nc: nats.NATS,
) -> None:
    """A member whose answer NATS would not carry (a group-wide list of very many agents)
    answers with an error naming the limit, instead of leaving the asker to time out."""

    async def too_large(msg: Any) -> None:
        await _reply(msg, {"ok": True, "result": "x" * routed_nc.max_payload})

    sub = await routed_nc.subscribe("test.too_large", cb=too_large)
    try:
        reply = await routed_nc.request("test.too_large", b"", timeout=5)
    finally:
        await sub.unsubscribe()
    answer = json.loads(reply.data)
    assert (answer["ok"], answer["type"]) == (False, "AnswerTooLarge")
    assert f"max_payload ({routed_nc.max_payload})" in answer["error"]
