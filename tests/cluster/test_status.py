"""`gatewayd cluster status` against a real nats-server: partitions read by key, and a read
that fails is reported as such (exit 69, "errors"), never shown as partitions without owners.

The failure is real, not simulated: a NATS user whose permissions deny creating consumers on
the members bucket cannot list its keys (the listing needs a consumer), as when a busy box or
a NATS node going away loses the consumer's answer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from gatewayd.cluster.naming import Names
from gatewayd.cluster.settings import ClusterSettings
from gatewayd.cluster.status import format_status, group_status
from tests.brokers import free_port
from tests.cluster.nats_cluster import NATS_BIN

GROUP = "site"
PASSWORD = "status-test-password"


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """One nats-server with JetStream and two users: `full`, and `blind`, who may not create
    consumers on the members bucket."""
    port = free_port()
    members_stream = f"KV_{Names(GROUP, 'gw.in').members_bucket}"
    config = tmp_path / "nats.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "authorization { users = [\n"
        f'  {{ user: full, password: "{PASSWORD}" }}\n'
        f'  {{ user: blind, password: "{PASSWORD}", permissions: {{ publish: {{ deny: [\n'
        f'    "$JS.API.CONSUMER.CREATE.{members_stream}",\n'
        f'    "$JS.API.CONSUMER.CREATE.{members_stream}.>" ] }} }} }}\n'
        "] }\n"
    )
    log = open(tmp_path / "nats.log", "ab")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([NATS_BIN, "-c", str(config)], stdout=log, stderr=log)
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)
        log.close()


async def _seed(url: str) -> None:
    """The group's buckets as members leave them: partitions 0 and 2 owned, 1 never; three
    members heartbeating, m3 without partitions."""
    names = Names(GROUP, "gw.in")
    nc = await _connect(url, "full")
    try:
        js = nc.jetstream(timeout=5)
        partitions = await js.create_key_value(bucket=names.partitions_bucket)
        await partitions.put(names.partition_key(0), b'{"owner": "m1", "epoch": 3}')
        await partitions.put(names.partition_key(2), b'{"owner": "m2", "epoch": 1}')
        members = await js.create_key_value(bucket=names.members_bucket)
        for member, held in (("m1", [0]), ("m2", [2]), ("m3", [])):
            record = {"at": time.time(), "partitions": held, "addresses": {}}
            await members.put(member, json.dumps(record).encode())
    finally:
        await nc.close()


async def _connect(url: str, user: str) -> nats.NATS:
    """Connected once the server answers (it was just started)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return await nats.connect(
                servers=[url], user=user, password=PASSWORD, max_reconnect_attempts=0,
                connect_timeout=1, allow_reconnect=False,
            )  # fmt: skip
        except Exception:
            if time.monotonic() > deadline:
                raise


def _settings(url: str, user: str) -> ClusterSettings:
    server = url.replace("nats://", f"nats://{user}:{PASSWORD}@")
    return ClusterSettings(agent_class="x", group=GROUP, servers=(server,), partitions=3)


async def test_status_reads_each_partition_by_key_and_lists_the_members(nats_url: str) -> None:
    await _seed(nats_url)
    status = await group_status(_settings(nats_url, "full"))
    assert "errors" not in status, status
    assert [(p["partition"], p["owner"], p["epoch"]) for p in status["partitions"]] == [
        (0, "m1", 3),
        (1, "", 0),
        (2, "m2", 1),
    ]
    assert sorted(m["member"] for m in status["members"]) == ["m1", "m2", "m3"]
    text = format_status(status)
    assert "(none)" in text and "NOT READ" not in text, text


async def test_a_read_that_fails_is_reported_not_shown_as_missing(nats_url: str) -> None:
    await _seed(nats_url)
    status = await group_status(_settings(nats_url, "blind"), timeout_s=1.0)
    # The partitions are read by key: unaffected by the listing that fails.
    assert [p["owner"] for p in status["partitions"]] == ["m1", "", "m2"]
    # The members' listing failed: the owners are read directly, and the status says so.
    assert sorted(m["member"] for m in status["members"]) == ["m1", "m2"]
    assert len(status["errors"]) == 1 and "listing failed" in status["errors"][0], status
    assert "NOT READ" in format_status(status)


def test_the_command_exits_69_on_a_partial_read(nats_url: str, tmp_path: Path) -> None:
    asyncio.run(_seed(nats_url))
    for user, expected in (("full", 0), ("blind", 69)):
        server = nats_url.replace("nats://", f"nats://{user}:{PASSWORD}@")
        config = tmp_path / f"{user}.toml"
        config.write_text(
            f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n'
            '[agents.classes.recorder]\nclass = "tests.cluster.cluster_agents:Recorder"\n'
            f'[cluster]\nenabled = true\ngroup = "{GROUP}"\nmember = "cli"\n'
            f'servers = ["{server}"]\nagent_class = "recorder"\npartitions = 3\n'
        )
        shown = subprocess.run(
            [sys.executable, "-m", "gatewayd", "cluster", "status", "--json", "--timeout", "1",
             "-c", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == expected, (user, shown.stdout, shown.stderr)
        status = json.loads(shown.stdout)
        assert [p["owner"] for p in status["partitions"]] == ["m1", "", "m2"]
        if expected:
            assert "could not be read" in shown.stderr, shown.stderr
