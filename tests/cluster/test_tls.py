"""`[cluster]` against a NATS server that requires TLS and a user/password: a member joins
through `tls://user:password@host` with the test's self-signed CA as `ca_file`, serves a
device message, and the group's status command connects the same way. Without the CA,
joining fails at once and says why."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from gatewayd.cluster.member import connect
from gatewayd.cluster.settings import ClusterSettings
from tests.brokers import free_port
from tests.certificates import self_signed
from tests.cluster.group import AGENT_CLASS, device_mapping
from tests.cluster.nats_cluster import NATS_BIN
from tests.gatewayd.daemon_process import GatewayProcess
from tests.gatewayd.notify import NotifySocket
from tests.waiting import wait_until

USER, PASSWORD = "gw", "s3cret-pass"


async def test_a_member_joins_through_tls_with_a_password(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    conf = tmp_path / "nats.conf"
    mappings = "".join(f'  "{src}": "{dst}"\n' for src, dst in device_mapping(4).items())
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path}/js", max_mem: 64MB, max_file: 256MB }}\n'
        f'tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}\n'
        f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}\n'
        f"mappings {{\n{mappings}}}\n"
    )
    log = open(tmp_path / "nats.log", "ab")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen([NATS_BIN, "-c", str(conf)], stdout=log, stderr=log)
    member: GatewayProcess | None = None
    notify = NotifySocket(tmp_path, abstract=True)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        url = f"tls://{USER}:{PASSWORD}@127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                nc = await nats.connect(servers=[url], tls=context, connect_timeout=1,
                                        max_reconnect_attempts=0, allow_reconnect=False)  # fmt: skip
                break
            except Exception:
                assert time.monotonic() < deadline, (tmp_path / "nats.log").read_text()
                await asyncio.sleep(0.1)
        # Without the password the server refuses.
        with pytest.raises(Exception):  # noqa: B017 (nats-py raises several kinds)
            await nats.connect(servers=[f"tls://127.0.0.1:{port}"], tls=context,
                               connect_timeout=1, max_reconnect_attempts=0,
                               allow_reconnect=False)  # fmt: skip

        def config(ca: Path | None) -> Path:
            path = tmp_path / "gatewayd.toml"
            path.write_text(
                f'[gateway]\nstate_dir = "{tmp_path / "state"}"\nlog_level = "info"\n'
                "[http]\nenabled = false\n[listeners.websocket]\nenabled = false\n"
                f'[agents.classes.{AGENT_CLASS}]\nclass = "tests.cluster.cluster_agents:Recorder"\n'
                f'[cluster]\nenabled = true\ngroup = "tls"\nmember = "t1"\nservers = ["{url}"]\n'
                f'agent_class = "{AGENT_CLASS}"\npartitions = 4\nreplicas = 1\n'
                'lease = "4s"\nheartbeat = "1s"\n' + (f'ca_file = "{ca}"\n' if ca else "")
            )
            return path

        # Without the CA the certificate is not trusted: joining fails at once, saying why
        # (and not showing the password).
        untrusting = ClusterSettings(agent_class=AGENT_CLASS, servers=(url,))
        with pytest.raises(ConnectionError) as refused:
            await connect(untrusting, "t0")
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value), refused.value
        assert PASSWORD not in str(refused.value)
        trusting = ClusterSettings(agent_class=AGENT_CLASS, servers=(url,), ca_file=str(cert))
        await (await connect(trusting, "t0")).close()

        member = GatewayProcess(config(cert), notify)
        member.start(wait_ready=True)
        js = nc.jetstream(timeout=10)
        echoes: list[bytes] = []

        async def echoed(msg: Msg) -> None:
            echoes.append(msg.data)

        sub = await nc.subscribe("gw.out.tls1", cb=echoed)
        await js.publish("devices.tls1.telemetry", b"hello over tls")
        await wait_until(lambda: echoes == [b"hello over tls"], 30, "the echo over TLS")
        await sub.unsubscribe()
        status = subprocess.run(
            [*_gatewayd(), "cluster", "status", "--json", "-c", str(member.config)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr[-2000:]
        assert '"t1"' in status.stdout, status.stdout
        await nc.close()
    finally:
        if member is not None:
            member.stop(timeout_s=20)
        notify.sock.close()
        server.terminate()
        server.wait(10)
        log.close()


def _gatewayd() -> list[str]:
    import sys

    return [sys.executable, "-m", "gatewayd"]
