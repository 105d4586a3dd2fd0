"""Device replies through JetStream (gatewayd/cluster/outputs.py) on a real nats-server: a
reply sent again under the same row seq (what a new owner does after a failover) is reported
delivered and stored once; replies keep their row order; links pick durable or live outputs."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from gatewayd.cluster.ingest import ClusterLink, DurableClusterLink
from gatewayd.cluster.outputs import JetStreamOutputs
from protocols.link import Route, durable_target
from tests.brokers import free_port
from tests.cluster.nats_cluster import NATS_BIN
from tests.waiting import wait_until


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[nats.NATS]:
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path}/js", max_mem: 16MB, max_file: 64MB }}\n'
    )
    log = open(tmp_path / "nats.log", "ab")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen([NATS_BIN, "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
                break
            except Exception:
                assert time.monotonic() < deadline, (tmp_path / "nats.log").read_text()
                await asyncio.sleep(0.05)
        js = client.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name="OUT", subjects=["gw.out.>"], duplicate_window=60))
        try:
            yield client
        finally:
            await client.close()
    finally:
        server.terminate()
        server.wait(10)
        log.close()


async def _stored(nc: nats.NATS) -> list[tuple[str, bytes]]:
    js = nc.jetstream(timeout=10)
    total = (await js.stream_info("OUT")).state.messages
    return [
        ((m := await js.get_msg("OUT", seq)).subject or "", m.data or b"")
        for seq in range(1, total + 1)
    ]


async def test_a_reply_sent_again_is_stored_once_and_links_choose_outputs(nc: nats.NATS) -> None:
    outputs = JetStreamOutputs(nc.jetstream(timeout=10))
    delivered: list[int] = []
    address = JetStreamOutputs.address("gw.out.dev1")
    for seq in (1, 2, 3):
        outputs.send_tracked(address, seq, f"r{seq}".encode(), delivered.append)
    await wait_until(lambda: delivered == [1, 2, 3], 10, "three replies acknowledged")
    # A new owner restored rows 2 and 3 (their deletion was not in the log yet) and sends them
    # again, with a new one after them.
    again: list[int] = []
    for seq in (2, 3, 4):
        outputs.send_tracked(address, seq, f"r{seq}".encode(), again.append)
    await wait_until(lambda: again == [2, 3, 4], 10, "the resends acknowledged")
    assert await _stored(nc) == [("gw.out.dev1", b"r1"), ("gw.out.dev1", b"r2"),
                                 ("gw.out.dev1", b"r3"), ("gw.out.dev1", b"r4")]  # fmt: skip
    await outputs.close()
    assert outputs.published == 6

    # Links pick durable outputs (the default) or live ones (durable_replies = false).
    route = Route("rec", "dev1")
    live = ClusterLink(nc, route, "gw.out.dev1")
    durable = DurableClusterLink(nc, route, "gw.out.dev1", outputs)
    assert durable_target(live) is None
    target = durable_target(durable)
    assert target is not None and target[0] is outputs
    assert target[1] == JetStreamOutputs.address("gw.out.dev1")
