"""An MQTT backlog and a TCP device feeding one agent of a real gatewayd process.

Used by tests/gatewayd/test_fairness.py and bench/mqtt_fairness.py: the broker holds `backlog`
QoS 1 messages for the gateway's persistent session; once the gateway starts, it drains them
into agent recorder/dev-1 while a TCP device sends frames to the same agent one at a time (the
next once the last one is acked) and records each frame's ACK latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from gatewayd.agents.storage import agent_db_path
from protocols.frames import Ack, Data, encode
from protocols.mqttwire.aio import MqttClient
from protocols.mqttwire.connection import ConnectOptions
from tests.brokers import MosquittoBroker, free_port
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.devices import TcpDevice
from tests.gatewayd.notify import NotifySocket
from tests.waiting import wait_until

CONFIG = """
[gateway]
state_dir = "state"
drain_timeout = "5s"
[http]
bind = "127.0.0.1:0"
[agents]
python_path = ["{repo}"]
[agents.classes.recorder]
class = "tests.gatewayd.e2e_agents:Recorder"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
[listeners.binary]
enabled = true
bind = "127.0.0.1:{tcp_port}"
agent_class = "recorder"
secrets_file = "devices.toml"
[mqtt]
enabled = true
broker_urls = ["{broker_url}"]
client_id = "gw-fair"
reconnect_max = "1s"
{mqtt_extra}
[[mqtt.routes]]
topic = "devices/{{id}}/telemetry"
agent_class = "recorder"
reply_topic = "devices/{{id}}/cmd"
"""


@dataclass(frozen=True)
class Drain:
    """One drain: the TCP frames' ACK latencies (s), how long until every backlog message was
    applied (s), and until the agent's reply to each had reached the device too (s)."""

    latencies: list[float]
    drain_s: float
    frames: int
    replied_s: float = math.nan

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else math.nan

    @property
    def p99(self) -> float:
        if not self.latencies:
            return math.nan
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]


class FairnessSite:
    """One gateway config (agent recorder, TCP listener, one MQTT route) in `directory`."""

    def __init__(
        self,
        directory: Path,
        broker: MosquittoBroker,
        notify: NotifySocket,
        *,
        mqtt_extra: str = "",
    ) -> None:
        self.tcp_port = free_port()
        self.broker = broker
        (directory / "devices.toml").write_text('"dev-1" = "s1"\n')
        (directory / "devices.toml").chmod(0o600)
        config = directory / "gatewayd.toml"
        config.write_text(
            CONFIG.format(
                repo=REPO,
                ws_port=free_port(),
                tcp_port=self.tcp_port,
                broker_url=broker.url,
                mqtt_extra=mqtt_extra,
            )
        )
        self.state_dir = directory / "state"
        self.process = GatewayProcess(config, notify)
        self._started_at = 0.0

    def rows(self) -> list[tuple[str, bytes]]:
        """What agent recorder/dev-1 committed, read straight from its SQLite file."""
        path = agent_db_path(self.state_dir, "recorder", "dev-1")
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone():
                return []
            return [
                (t, bytes(b))
                for t, b in db.execute("SELECT transport, body FROM messages ORDER BY n")
            ]

    def mqtt_applied(self) -> int:
        path = agent_db_path(self.state_dir, "recorder", "dev-1")
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone():
                return 0
            row = db.execute("SELECT count(*) FROM messages WHERE transport = 'mqtt'").fetchone()
            return int(row[0])

    async def queue_backlog(self, payloads: list[bytes]) -> None:
        """Let the gateway create its persistent session, stop it, then publish `payloads` to
        dev-1 at QoS 1 (pipelined): the broker queues them for the gateway's next start."""
        self.process.start()
        self.process.wait_log("mqtt: connected")
        self.process.stop()
        options = ConnectOptions("flood", max_inflight=200)
        async with MqttClient(self.broker.host, self.broker.port, options) as publisher:
            for start in range(0, len(payloads), 200):
                await asyncio.gather(
                    *(
                        publisher.publish("devices/dev-1/telemetry", p, qos=1)
                        for p in payloads[start : start + 200]
                    )
                )

    async def drain_with_tcp_probe(
        self, backlog: int, timeout_s: float = 30.0, *, probe: bool = True
    ) -> Drain:
        """Start the gateway and send TCP frames to the same agent, one at a time, until all
        `backlog` MQTT messages are applied (or `timeout_s`: TimeoutError). Without `probe`,
        only time the drain."""
        replies = 0
        options = ConnectOptions("dev-1-replies")  # a clean session, QoS 0: counts only

        async def count_replies(client: MqttClient) -> None:
            nonlocal replies
            while True:
                await client.receive()
                replies += 1

        async with MqttClient(self.broker.host, self.broker.port, options) as listener:
            await listener.subscribe("devices/dev-1/cmd", qos=0, timeout=5)
            counter = asyncio.create_task(count_replies(listener))
            try:
                drain = await self._drain(backlog, timeout_s, probe)
                await wait_until(lambda: replies >= backlog, timeout_s, "every reply")
                replied_s = time.monotonic() - self._started_at
            finally:
                counter.cancel()
        return Drain(drain.latencies, drain.drain_s, drain.frames, replied_s)

    async def _drain(self, backlog: int, timeout_s: float, probe: bool) -> Drain:
        self.process.start()
        started_at = self._started_at = time.monotonic()
        drained = asyncio.Event()
        drained_at = 0.0

        async def watch() -> None:
            nonlocal drained_at
            await wait_until(
                lambda: self.mqtt_applied() >= backlog,
                timeout_s,
                "the MQTT backlog applied",
                poll_s=0.02,
            )
            drained_at = time.monotonic()
            drained.set()

        watcher = asyncio.create_task(watch())
        device = TcpDevice(self.tcp_port, "dev-1", "s1")
        latencies: list[float] = []
        try:
            async with asyncio.timeout(timeout_s):
                if not probe:
                    await watcher
                    return Drain([], drained_at - started_at, 0)
                await device.connect()
                seq = 0
                while not drained.is_set():
                    seq += 1
                    sent_at = time.monotonic()
                    device.writer.write(encode(Data(seq, f"tcp-{seq}".encode())))
                    while Ack(seq) not in device.received:
                        await device.next_frame()
                    latencies.append(time.monotonic() - sent_at)
                await watcher
        finally:
            watcher.cancel()
            if probe:
                device.writer.close()
        return Drain(latencies, drained_at - started_at, seq)
