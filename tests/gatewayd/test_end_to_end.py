"""The whole gateway as a subprocess: a real mosquitto, real TCP frames, real WebSockets.

One agent serves an MQTT device, a binary TCP device and a JSON dashboard at once; a SIGKILL
mid-stream loses no MQTT message and applies no TCP frame twice; a wedged event loop stops the
systemd watchdog pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from websockets.asyncio.client import connect as ws_connect

from gatewayd.agents.storage import agent_db_path
from protocols.frames import Ack, Data, Push, encode
from tests.brokers import MosquittoBroker, free_port
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.devices import TcpDevice
from tests.gatewayd.notify import NotifySocket
from tests.waiting import wait_until

CONFIG = """
[gateway]
state_dir = "state"
drain_timeout = "5s"
status_interval = "200ms"
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
max_unacked = 64
[mqtt]
enabled = true
broker_urls = ["{broker_url}"]
client_id = "gw-e2e"
reconnect_max = "1s"
[[mqtt.routes]]
topic = "devices/{{id}}/telemetry"
agent_class = "recorder"
reply_topic = "devices/{{id}}/cmd"
"""


class Site:
    """Ports, config and the daemon of one end-to-end test."""

    def __init__(self, tmp_path: Path, broker: MosquittoBroker, notify: NotifySocket) -> None:
        self.ws_port, self.tcp_port = free_port(), free_port()
        (tmp_path / "devices.toml").write_text('"dev-1" = "s1"\n"dev-2" = "s2"\n')
        (tmp_path / "devices.toml").chmod(0o600)
        config = tmp_path / "gatewayd.toml"
        config.write_text(
            CONFIG.format(
                repo=REPO, ws_port=self.ws_port, tcp_port=self.tcp_port, broker_url=broker.url
            )
        )
        self.state_dir = tmp_path / "state"
        self.broker = broker
        self.gateway = GatewayProcess(config, notify)

    def rows(self, agent_id: str) -> list[tuple[str, bytes]]:
        """What the agent committed, read straight from its SQLite file."""
        path = agent_db_path(self.state_dir, "recorder", agent_id)
        if not path.exists():
            return []
        # Read-write, as any reader after a crash: a SIGKILL during a commit leaves a WAL index
        # that needs recovery, which a read-only connection refuses ("attempt to write a
        # readonly database"). Reading changes nothing that was committed.
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            # A daemon killed between creating the file and committing `on_start`'s CREATE
            # TABLE leaves a file without the table: that agent has committed nothing yet.
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone():
                return []
            return [
                (t, bytes(b))
                for t, b in db.execute("SELECT transport, body FROM messages ORDER BY n")
            ]


@pytest.fixture
def site(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[Site]:
    notify = NotifySocket(tmp_path)
    site = Site(tmp_path, mosquitto, notify)
    try:
        yield site
    finally:
        try:
            site.gateway.stop()
        finally:
            notify.close()


async def test_one_agent_serves_mqtt_tcp_and_a_dashboard(site: Site) -> None:
    site.gateway.start()
    async with aiomqtt.Client("127.0.0.1", site.broker.port, identifier="dev-1-device") as device:
        await device.subscribe("devices/dev-1/cmd", qos=1)
        async with ws_connect(f"ws://127.0.0.1:{site.ws_port}/agents/recorder/dev-1") as dashboard:
            identity = json.loads(await dashboard.recv())
            assert identity["type"] == "gw.identity" and identity["id"] == "dev-1"
            assert json.loads(await dashboard.recv()) == {"type": "gw.state", "state": {"count": 0}}
            tcp = TcpDevice(site.tcp_port, "dev-1", "s1")
            await tcp.connect()

            await device.publish("devices/dev-1/telemetry", b"from-mqtt", qos=1)
            reply = await asyncio.wait_for(anext(aiter(device.messages)), 10)
            assert reply.payload == b"ack 1"
            assert json.loads(await dashboard.recv())["state"] == {"count": 1}

            tcp.writer.write(encode(Data(1, b"from-tcp")))
            assert json.loads(await dashboard.recv())["state"] == {"count": 2}
            await dashboard.send("from-dashboard")
            # In the agent's order: the state sync (set_state), then its direct reply.
            assert json.loads(await dashboard.recv())["state"] == {"count": 3}
            assert await dashboard.recv() == "ack 3"

            # Barriers instead of "nothing within 0.5 s": one more message on each transport.
            # Replies keep the agent's order, so an identity or state frame wrongly sent to the
            # MQTT or TCP device would arrive before the barrier's reply.
            await device.publish("devices/dev-1/telemetry", b"barrier", qos=1)
            reply = await asyncio.wait_for(anext(aiter(device.messages)), 10)
            assert reply.payload == b"ack 4", "the MQTT device gets its replies and nothing else"
            tcp.writer.write(encode(Data(2, b"barrier")))

            def pushed() -> list[bytes]:
                return [f.payload for f in tcp.received if isinstance(f, Push)]

            while Ack(2) not in tcp.received or b"ack 5" not in pushed():
                await tcp.next_frame()
            kinds = sorted(type(f).__name__ for f in tcp.received)
            assert kinds == ["Ack", "Ack", "HelloOk", "Push", "Push"], tcp.received
            assert [f.seq for f in tcp.received if isinstance(f, Ack)] == [1, 2]
            assert pushed() == [b"ack 2", b"ack 5"]  # the agent's replies; never a JSON frame
    assert site.gateway.stop() == 0
    assert site.rows("dev-1") == [
        ("mqtt", b"from-mqtt"),
        ("tcp", b"from-tcp"),
        ("ws", b"from-dashboard"),
        ("mqtt", b"barrier"),
        ("tcp", b"barrier"),
    ]


async def _send_frames(device: TcpDevice, count: int, window: int, progress: asyncio.Event) -> None:
    """Send seq 1..count with at most `window` unacked; on a lost connection reconnect and resend
    every unacked frame with its original seq (what FRAMES.md asks of firmware)."""
    next_seq, acked = 1, 0
    while acked < count:
        try:
            await device.connect()
            for seq in range(acked + 1, next_seq):  # unacked frames from the last connection
                device.writer.write(encode(Data(seq, f"tcp-{seq}".encode(), resend=True)))
            while acked < count:
                while next_seq <= count and next_seq - acked <= window:
                    device.writer.write(encode(Data(next_seq, f"tcp-{next_seq}".encode())))
                    next_seq += 1
                frame = await device.next_frame()
                if isinstance(frame, Ack):
                    acked = max(acked, frame.seq)
                    if acked >= 50:
                        progress.set()
        except (ConnectionError, OSError, TimeoutError):
            # Python 3.11's wait_for raises the connection error that raced a cancellation
            # instead of CancelledError; retrying then would loop forever against a stopped
            # gateway (pytest-asyncio's teardown hung on exactly that).
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from None
            await asyncio.sleep(0.2)  # the device's reconnect back-off


async def test_sigkill_mid_stream_loses_nothing_and_applies_no_frame_twice(site: Site) -> None:
    site.gateway.start()
    site.gateway.wait_log("mqtt: connected")
    site.gateway.stop()  # the broker now holds the gateway's persistent session
    messages = 1000
    async with aiomqtt.Client("127.0.0.1", site.broker.port, identifier="publisher") as publisher:
        for i in range(messages):
            await publisher.publish(f"devices/dev-{i % 10}/telemetry", f"slow:{i}".encode(), qos=1)

    site.gateway.start()
    device = TcpDevice(site.tcp_port, "dev-1", "s1")
    progress = asyncio.Event()
    sender = asyncio.create_task(_send_frames(device, 400, 32, progress))

    def applied() -> int:
        return sum(1 for i in range(10) for t, _ in site.rows(f"dev-{i}") if t == "mqtt")

    try:
        # Whichever stream is first under way (the MQTT backlog may outrun the TCP frames).
        await wait_until(
            lambda: progress.is_set() or applied() >= 100, 20, "either stream under way"
        )
        site.gateway.kill()  # SIGKILL: no drain, no goodbye
        applied_at_kill = applied()
        assert applied_at_kill < messages, "the kill should land mid-stream"

        site.gateway.start()
        await asyncio.wait_for(sender, 60)

        def stored() -> int:
            return len({b for i in range(10) for t, b in site.rows(f"dev-{i}") if t == "mqtt"})

        await wait_until(lambda: stored() == messages, 60, "every MQTT message", poll_s=0.2)
    finally:
        sender.cancel()
        await asyncio.wait({sender}, timeout=10)  # wait() never waits past its timeout
    assert site.gateway.stop() == 0

    mqtt_bodies = {b for i in range(10) for t, b in site.rows(f"dev-{i}") if t == "mqtt"}
    assert mqtt_bodies == {f"slow:{i}".encode() for i in range(messages)}  # none lost
    tcp_bodies = [b for t, b in site.rows("dev-1") if t == "tcp"]
    assert sorted(tcp_bodies) == sorted(f"tcp-{s}".encode() for s in range(1, 401))  # none twice


async def test_wedged_event_loop_stops_watchdog_pings(tmp_path: Path, site: Site) -> None:
    site.gateway.extra_env["WATCHDOG_USEC"] = "500000"  # a ping every 0.25 s while healthy
    site.gateway.start()
    notify = site.gateway.notify
    async with ws_connect(f"ws://127.0.0.1:{site.ws_port}/agents/recorder/dev-1") as dashboard:
        await dashboard.recv()
        mark = len(notify.messages)
        await dashboard.send("block-the-loop")  # the handler sleeps 2.5 s on the event loop
        await asyncio.to_thread(notify.collect, 4.0)
    pings = [t for t, m in notify.messages[mark:] if m.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 2.0, "no pings while the loop was wedged"
    assert len(pings) >= 4, "pings resume once the loop turns again"
    site.gateway.send_signal(signal.SIGTERM)


def test_an_agent_file_without_its_table_has_no_rows_yet(site: Site) -> None:
    # What a SIGKILL between creating the file and committing on_start's CREATE TABLE leaves
    # behind (the flaky "no such table: messages" right after the kill).
    path = agent_db_path(site.state_dir, "recorder", "dev-1")
    path.parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(path).close()
    assert path.exists()
    assert site.rows("dev-1") == []
