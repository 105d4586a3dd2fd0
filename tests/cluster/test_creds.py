"""`[cluster] credentials_file` against a nats-server in operator mode (decentralized JWT
auth, as `nsc` sets it up): the test makes an operator, a system account, an application
account with JetStream and users (nkeys, signed JWTs: tests/cluster/nats_jwt.py) and writes
standard `.creds` files. A member that has only its `.creds` file joins, serves a device
message end to end (its state is in the changelog, its reply published); a user the servers
do not know, and a missing or malformed file, stop the start-up at once with a message that
names the file, and the seed is never printed."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nkeys
import pytest
from nats.aio.msg import Msg

from gatewayd.cluster.credentials import (
    CredentialsError,
    CredentialsSigner,
    read_user_credentials,
)
from gatewayd.cluster.settings import ClusterSettings
from tests.brokers import free_port
from tests.cluster.group import AGENT_CLASS, device_mapping, read_group_state
from tests.cluster.nats_cluster import NATS_BIN
from tests.cluster.nats_jwt import Operator, creds_text, new_keys, public, user_jwt
from tests.gatewayd.daemon_process import GatewayProcess
from tests.gatewayd.notify import NotifySocket
from tests.waiting import wait_until

PARTITIONS = 4
GROUP = "creds"
EXIT_CONFIG = 78  # gatewayd.cli: a configuration error


@dataclass
class OperatorServer:
    operator: Operator
    url: str
    log: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OperatorServer]:
    """One nats-server (JetStream on) that trusts only the test's operator."""
    operator = Operator(tmp_path, mappings=device_mapping(PARTITIONS))
    port = free_port()
    conf, log_path = tmp_path / "nats.conf", tmp_path / "nats.log"
    conf.write_text(operator.server_config(port, tmp_path / "js"))
    with open(log_path, "ab") as log:
        process = subprocess.Popen([NATS_BIN, "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while "Server is ready" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield OperatorServer(operator, f"nats://127.0.0.1:{port}", log_path)
    finally:
        process.terminate()
        process.wait(10)


def _member_config(directory: Path, url: str, creds: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gatewayd.toml"
    path.write_text(
        f'[gateway]\nstate_dir = "{directory / "state"}"\nlog_level = "info"\n'
        "[http]\nenabled = false\n[listeners.websocket]\nenabled = false\n"
        f'[agents.classes.{AGENT_CLASS}]\nclass = "tests.cluster.cluster_agents:Recorder"\n'
        f'[cluster]\nenabled = true\ngroup = "{GROUP}"\nmember = "c1"\nservers = ["{url}"]\n'
        f'credentials_file = "{creds}"\nagent_class = "{AGENT_CLASS}"\n'
        f'partitions = {PARTITIONS}\nreplicas = 1\nlease = "4s"\nheartbeat = "1s"\n'
    )
    return path


async def test_a_member_with_only_a_creds_file_serves_a_device(
    server: OperatorServer, tmp_path: Path
) -> None:
    member_creds, member_seed = server.operator.user("member")
    device_creds, _ = server.operator.user("device")
    # Without credentials the server refuses; with the device's .creds it accepts.
    with pytest.raises(Exception):  # noqa: B017 (nats-py raises several kinds)
        await nats.connect(servers=[server.url], connect_timeout=1, allow_reconnect=False)
    nc = await nats.connect(servers=[server.url], user_credentials=str(device_creds),
                            connect_timeout=2, allow_reconnect=False)  # fmt: skip
    notify = NotifySocket(tmp_path, abstract=True)
    member = GatewayProcess(_member_config(tmp_path / "c1", server.url, member_creds), notify)
    try:
        member.start(wait_ready=True)
        echoes: list[bytes] = []

        async def echoed(msg: Msg) -> None:
            echoes.append(msg.data)

        sub = await nc.subscribe("gw.out.cr1", cb=echoed)
        # Through the account's own subject mapping (in its JWT) into partition gw.in.<P>.
        await nc.jetstream(timeout=10).publish("devices.cr1.telemetry", b"hello with creds")
        await wait_until(lambda: echoes == [b"hello with creds"], 30, "the reply")
        await sub.unsubscribe()
        state = await read_group_state(nc, PARTITIONS, group=GROUP)
        assert state == {"cr1": ["hello with creds"]}, state
        assert "joined group creds" in member.log_text()
    finally:
        await nc.close()
        member.stop(timeout_s=20)
        notify.sock.close()
    assert member_seed not in member.log_text()


async def test_each_connect_reads_the_file_and_a_broken_one_fails_it_at_once(
    server: OperatorServer,
) -> None:
    """The file is read at each (re)connect (`CredentialsSigner`): a renewed file is used, a
    broken one fails that connect with the file's problem, at once (nats-py's own reader
    would loop forever on a file without its JWT block)."""
    creds, seed = server.operator.user("rotated")
    signer = CredentialsSigner(str(creds))
    options: dict[str, Any] = {"servers": [server.url], "connect_timeout": 2,
                               "allow_reconnect": False}  # fmt: skip
    nc = await nats.connect(user_jwt_cb=signer.user_jwt, signature_cb=signer.sign, **options)
    await nc.close()
    renewed, renewed_seed = server.operator.user("renewed")
    creds.write_text(renewed.read_text())
    nc = await nats.connect(user_jwt_cb=signer.user_jwt, signature_cb=signer.sign, **options)
    await nc.close()
    creds.write_text("\n".join(renewed.read_text().split("\n")[4:]))  # no JWT block
    with pytest.raises(nats.errors.Error) as failed:
        await asyncio.wait_for(
            nats.connect(user_jwt_cb=signer.user_jwt, signature_cb=signer.sign, **options), 10
        )
    assert f"credentials_file {creds}: no '-----BEGIN NATS USER JWT-----' line" in str(failed.value)
    assert seed not in str(failed.value) and renewed_seed not in str(failed.value)


async def test_a_user_the_servers_do_not_know_stops_the_start_up_at_once(
    server: OperatorServer, tmp_path: Path
) -> None:
    """A well-formed file of a user of an account the operator never signed."""
    stranger = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
    creds, seed = server.operator.user("stranger", account=stranger)
    code, log = await _failed_start(_member_config(tmp_path / "c1", server.url, creds), tmp_path)
    assert code == 1, log[-3000:]
    assert f"credentials_file {creds}: the servers refused user" in log, log[-3000:]
    assert public(stranger) in log, log[-3000:]
    assert seed not in log


async def test_an_account_without_jetstream_stops_the_start_up_saying_so(
    server: OperatorServer, tmp_path: Path
) -> None:
    creds, seed = server.operator.user("plain", account=server.operator.plain)
    code, log = await _failed_start(_member_config(tmp_path / "c1", server.url, creds), tmp_path)
    assert code == 1, log[-3000:]
    assert "JetStream is not enabled for this member's NATS account" in log, log[-3000:]
    assert f"{public(server.operator.plain)}, of credentials_file {creds}" in log, log[-3000:]
    assert seed not in log


async def _failed_start(config: Path, tmp_path: Path) -> tuple[int, str]:
    """`(exit code, log)` of a member whose start-up must fail at once (within 15 s)."""
    notify = NotifySocket(tmp_path, abstract=True)
    member = GatewayProcess(config, notify)
    started = time.monotonic()
    member.start(wait_ready=False)
    try:
        assert member.proc is not None
        code = await asyncio.to_thread(member.proc.wait, 30)
    finally:
        member.stop(timeout_s=10)
        notify.sock.close()
    assert time.monotonic() - started < 15, "a start-up that cannot succeed must not retry long"
    return code, member.log_text()


def _variants(operator: Operator) -> dict[str, tuple[str, str]]:
    """`{name: (file text, what the error must say)}`: broken .creds files."""
    good, _ = operator.user("good")
    text = good.read_text()
    lines = text.split("\n")
    jwt, seed = lines[1], lines[9]
    assert seed.startswith("SU"), lines
    other = new_keys(nkeys.PREFIX_BYTE_USER)
    stranger = new_keys(nkeys.PREFIX_BYTE_USER)
    app_jwt = operator.accounts[public(operator.app)]
    expired = user_jwt(operator.app, other, "old", expires=int(time.time()) - 60)
    return {
        "no JWT block": ("\n".join(lines[4:]), "no '-----BEGIN NATS USER JWT-----' line"),
        "no seed block": ("\n".join(lines[:3]), "no '-----BEGIN USER NKEY SEED-----' line"),
        "empty JWT": (text.replace(jwt, ""), "the user JWT is missing"),
        "damaged JWT": (text.replace(jwt, _truncated_claims(jwt)), "cannot be decoded"),
        "damaged seed": (text.replace(seed, seed[:-6] + "AAAAAA"), "does not hold a valid seed"),
        "two users": (creds_text(user_jwt(operator.app, other, "x"), stranger), "mixes two users"),
        "an account JWT": (creds_text(app_jwt, other), "not a user JWT"),
        "CRLF": (text.replace("\n", "\r\n"), "Unix line endings"),
        "expired": (creds_text(expired, other), "expired at"),
    }


def test_a_malformed_or_missing_creds_file_is_named_and_the_seed_never_shown(
    tmp_path: Path,
) -> None:
    operator = Operator(tmp_path)
    for name, (text, says) in _variants(operator).items():
        path = tmp_path / f"{name.replace(' ', '-')}.creds"
        path.write_bytes(text.encode())
        with pytest.raises(CredentialsError) as raised:
            ClusterSettings(agent_class=AGENT_CLASS, credentials_file=str(path))
        message = str(raised.value)
        assert message.startswith(f"credentials_file {path}: "), (name, message)
        assert says in message, (name, message)
        for secret in _seeds(text):
            assert secret not in message, (name, message)
    missing = tmp_path / "missing.creds"
    with pytest.raises(CredentialsError, match=re.escape(f"credentials_file {missing}: cannot be")):
        read_user_credentials(str(missing))


def _truncated_claims(jwt: str) -> str:
    header, claims, signature = jwt.split(".")
    return f"{header}.{claims[:-8]}.{signature}"


def _seeds(text: str) -> list[str]:
    return [word for word in text.split() if word.startswith("SU") and len(word) > 20]


def test_the_daemon_stops_at_once_on_a_creds_file_nats_py_would_hang_on(tmp_path: Path) -> None:
    """A file without its JWT block makes nats-py loop forever at connect: `gatewayd run`
    refuses it as a configuration error before connecting."""
    operator = Operator(tmp_path)
    good, seed = operator.user("member")
    broken = tmp_path / "broken.creds"
    broken.write_text("\n".join(good.read_text().split("\n")[4:]))
    config = _member_config(tmp_path / "c1", "nats://127.0.0.1:1", broken)
    run = subprocess.run(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == EXIT_CONFIG, run.stderr[-3000:]
    assert f"credentials_file {broken}: no '-----BEGIN NATS USER JWT-----' line" in run.stderr
    assert seed not in run.stderr + run.stdout
