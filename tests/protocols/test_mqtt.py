"""MQTT bridge against a real Mosquitto, with a real SQLite-committing LinkHandler."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from protocols.mqtt import MqttBridge, MqttConfigError, MqttRoute, MqttSettings
from protocols.mqtt_settings import RouteTable, parse_broker_url
from tests.brokers import MosquittoBroker, free_port
from tests.protocols.mqtt_bridge_runner import read_messages
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
THERMOSTAT = MqttRoute("devices/{id}/telemetry", "thermostat", "devices/{id}/cmd")
METER = MqttRoute("sites/main/meters/{id}", "meter", "sites/main/meters/{id}/set")
ODD_IDS = [
    "température-✓",
    "日本語デバイス",
    "x" * 2000,
    "..",
    "..\\..\\windows\\system32",
    "$weird~id",
    "a b:c\\d*?<>|\"'",
    "emoji-🌡️",
]


CLIENT_KIND = "native"  # set by the `mqtt_client` fixture (conftest)
NATIVE_ONLY = pytest.mark.parametrize("mqtt_client", ["native"], indirect=True)
pytestmark = pytest.mark.usefixtures("mqtt_client")


def settings_for(broker: MosquittoBroker, **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "client": CLIENT_KIND,
        "broker_urls": (broker.url,),
        "client_id": "gw-test",
        "routes": (THERMOSTAT,),
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "retry_min_s": 0.01,
        "retry_max_s": 0.05,
    }
    values.update(overrides)
    return MqttSettings(**values)


async def publish_all(broker: MosquittoBroker, items: list[tuple[str, bytes]], **kw: Any) -> None:
    """Publish at QoS 1 (up to 100 in flight) and return once the broker PUBACKed all."""
    async with aiomqtt.Client(broker.host, broker.port, max_inflight_messages=100) as client:
        client.pending_calls_threshold = 1000
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            await asyncio.gather(*(client.publish(t, p, qos=1, **kw) for t, p in chunk))


async def receive_queued(
    broker: MosquittoBroker, device_id: str, topic: str, expected: set[bytes]
) -> set[bytes]:
    """Connect as `device_id` with a persistent session (so what the broker queued for it while
    it was away comes too), subscribe to `topic` at QoS 1, collect payloads until all of
    `expected` arrived; fails after 10 s."""
    received: set[bytes] = set()
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=device_id, clean_session=False
    ) as device:
        await device.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for message in device.messages:
                received.add(bytes(message.payload))
                if received == expected:
                    break
    return received


async def retained(broker: MosquittoBroker, topic: str) -> bytes | None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    return bytes(message.payload)
        except TimeoutError:
            return None
    return None


def link_events(db_path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT event, agent_id, context FROM link_events ORDER BY seq"
        ).fetchall()
    db.close()
    return rows


# ----------------------------------------------------------------- settings and routes (pure)


def test_routes_become_filters_and_ids_parse_back() -> None:
    table = RouteTable((THERMOSTAT, METER))
    assert table.filters == ("devices/+/telemetry", "sites/main/meters/+")
    for device_id in ODD_IDS:
        match = table.match(f"devices/{device_id}/telemetry")
        assert match is not None and match.device_id == device_id
        assert match.route.agent_class == "thermostat"
        assert table.reply_topic(match.route_index, device_id) == f"devices/{device_id}/cmd"
    meter = table.match("sites/main/meters/m-1")
    assert meter is not None and (meter.route.agent_class, meter.device_id) == ("meter", "m-1")
    assert table.reply_topic(meter.route_index, "m-1") == "sites/main/meters/m-1/set"
    for foreign in (
        "devices//telemetry",
        "devices/a/b/telemetry",
        "devices/a",
        "other/a/telemetry",
    ):
        assert table.match(foreign) is None, foreign


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"routes": (MqttRoute("devices/telemetry", "t", "devices/{id}/cmd"),)}, "routes[0].topic"),
        ({"routes": (MqttRoute("dev-{id}/t", "t", "devices/{id}/cmd"),)}, "routes[0].topic"),
        ({"routes": (MqttRoute("devices/+/{id}", "t", "d/{id}"),)}, "routes[0].topic"),
        ({"routes": (MqttRoute("devices/{id}/t", "t", "devices/cmd"),)}, "routes[0].reply_topic"),
        ({"routes": (MqttRoute("d/{id}", "", "d/{id}/c"),)}, "routes[0].agent_class"),
        ({"routes": (THERMOSTAT, THERMOSTAT)}, "routes[1].topic"),
        ({"routes": ()}, "mqtt.routes"),
        ({"broker_urls": ("http://x:1",)}, "broker_urls"),
        ({"broker_urls": ()}, "broker_urls"),
        ({"qos": 2}, "mqtt.qos"),
        ({"protocol": "3.1"}, "mqtt.protocol"),
        ({"client": "paho"}, "mqtt.client"),
        ({"client_id": ""}, "mqtt.client_id"),
        ({"max_pending_messages": 0}, "max_pending_messages"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect_min_s"),
        ({"cert_file": "/c.pem"}, "key_file"),
    ],
)
def test_invalid_settings_name_the_setting(overrides: dict[str, Any], names: str) -> None:
    values: dict[str, Any] = {"routes": (THERMOSTAT,), **overrides}
    with pytest.raises(MqttConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        MqttSettings(**values)


def test_broker_urls() -> None:
    assert str(parse_broker_url("mqtt://broker.local")) == "mqtt://broker.local:1883"
    assert str(parse_broker_url("mqtts://10.0.0.1")) == "mqtts://10.0.0.1:8883"
    address = parse_broker_url("mqtt://[::1]:1999")
    assert (address.host, address.port, address.tls) == ("::1", 1999, False)
    settings = MqttSettings(broker_urls=["mqtt://a:1", "mqtts://b:2"], routes=[THERMOSTAT])
    assert settings.broker_urls == ("mqtt://a:1", "mqtts://b:2")


# ----------------------------------------------------------------- against a real broker


async def test_routes_odd_ids_to_agents_and_replies_reach_cmd_topic(
    mosquitto: MosquittoBroker, handler_factory, tmp_path: Path
) -> None:
    handler = await handler_factory(reply=lambda link, data: b"ack:" + data)
    bridge = MqttBridge(settings_for(mosquitto, routes=(THERMOSTAT, METER)), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    assert await retained(mosquitto, "gatewayd/gw-test/status") == b"online"

    replies: dict[str, bytes] = {}
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
        await device.subscribe("devices/+/cmd", qos=1)
        await device.subscribe("sites/main/meters/+/set", qos=1)
        items = [(f"devices/{i}/telemetry", f"t:{n}".encode()) for n, i in enumerate(ODD_IDS)]
        items += [(f"devices/{ODD_IDS[0]}/telemetry", b"second"), ("sites/main/meters/m1", b"kwh")]
        await publish_all(mosquitto, items)
        async with asyncio.timeout(5):
            async for message in device.messages:
                replies.setdefault(message.topic.value, b"")
                replies[message.topic.value] += bytes(message.payload)
                if sum(1 for _ in replies) == len(ODD_IDS) + 1 and b"second" in b"".join(
                    replies.values()
                ):
                    break

    rows = read_messages(tmp_path / "agents.sqlite")
    assert sorted((c, i, p) for c, i, _, p in rows) == sorted(
        [("thermostat", i, f"t:{n}".encode()) for n, i in enumerate(ODD_IDS)]
        + [("thermostat", ODD_IDS[0], b"second"), ("meter", "m1", b"kwh")]
    )
    for n, device_id in enumerate(ODD_IDS):
        assert replies[f"devices/{device_id}/cmd"].startswith(f"ack:t:{n}".encode())
    assert replies[f"devices/{ODD_IDS[0]}/cmd"] == b"ack:t:0ack:second"
    assert replies["sites/main/meters/m1/set"] == b"ack:kwh"

    # One link per device: opened once, even for two messages.
    opens = [agent_id for event, agent_id, _ in link_events(tmp_path / "agents.sqlite")]
    assert sorted(opens) == sorted([*ODD_IDS, "m1"])
    link = handler.links[f"mqtt:devices/{ODD_IDS[0]}/telemetry"]
    assert (link.transport, link.route.agent_class, link.route.agent_id) == (
        "mqtt",
        "thermostat",
        ODD_IDS[0],
    )

    # The gateway closes a link: on_close runs, and the device's next message opens a new one.
    link.close(4000, "bye")
    await publish_all(mosquitto, [(f"devices/{ODD_IDS[0]}/telemetry", b"third")])
    await wait_until(
        lambda: len(read_messages(tmp_path / "agents.sqlite")) == len(rows) + 1, 5, "third"
    )
    events = [
        (e, ctx)
        for e, agent_id, ctx in link_events(tmp_path / "agents.sqlite")
        if agent_id == ODD_IDS[0]
    ]
    assert [e for e, _ in events] == ["open", "close", "open"] and events[1][1] == "4000 bye"

    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the last ack")
    stats = bridge.stats
    assert stats.messages_in == len(rows) + 1 and stats.extra["acked"] == len(rows) + 1
    assert stats.extra["connected"] == 1 and stats.links_open == len(ODD_IDS) + 1

    await bridge.stop(drain_timeout_s=5)
    assert not bridge.connected and bridge.state == "stopped"
    closes = [
        agent_id
        for e, agent_id, ctx in link_events(tmp_path / "agents.sqlite")
        if ctx == "1001 gateway shutting down"
    ]
    assert sorted(closes) == sorted([*ODD_IDS, "m1"])
    assert await retained(mosquitto, "gatewayd/gw-test/status") == b"offline"


async def test_foreign_oversized_and_retained_messages_are_acked_not_processed(
    mosquitto: MosquittoBroker, handler_factory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler = await handler_factory()
    # A retained message published before we ever subscribed is old state, not a new event;
    # the broker replays it (retain flag set) on every subscribe.
    await publish_all(mosquitto, [("devices/r1/telemetry", b"stale")], retain=True)
    # A first run subscribes to both routes; the persistent session remembers both filters.
    first = MqttBridge(settings_for(mosquitto, routes=(THERMOSTAT, METER)), handler)
    await first.start()
    await first.wait_connected(timeout_s=5)
    await first.stop()

    settings = settings_for(mosquitto, routes=(THERMOSTAT,), max_payload_bytes=1000)
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    await publish_all(
        mosquitto,
        [
            ("sites/main/meters/m1", b"not ours any more"),
            ("devices/big/telemetry", b"x" * 1001),
            ("devices/ok/telemetry", b"y" * 1000),
        ],
    )
    await wait_until(lambda: len(read_messages(db)) == 1, 5, "the in-size message")
    await wait_until(lambda: bridge.stats.extra.get("unrouted") == 1, 5, "unrouted count")
    stats = bridge.stats.extra
    assert stats["oversized"] == 1 and stats["retained_skipped"] == 1
    assert [(i, p) for _, i, _, p in read_messages(db)] == [("ok", b"y" * 1000)]
    await bridge.stop()

    # They were acked: a restart with the same session gets none of them again.
    again = MqttBridge(settings, handler)
    await again.start()
    await again.wait_connected(timeout_s=5)
    await publish_all(mosquitto, [("devices/ok/telemetry", b"after")])
    await wait_until(lambda: len(read_messages(db)) == 2, 5, "the message after restart")
    assert again.stats.extra.get("unrouted", 0) == 0
    assert again.stats.extra.get("oversized", 0) == 0
    assert again.stats.extra["retained_skipped"] == 1  # replayed again on subscribe, skipped
    await again.stop()


async def test_failed_turn_is_retried_without_ack_and_refusal_is_final(
    mosquitto: MosquittoBroker, handler_factory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    failures = {"left": 3}

    def fail(data: bytes | str) -> bool:
        if data == b"flaky" and failures["left"] > 0:
            failures["left"] -= 1
            return True
        return False

    handler = await handler_factory(fail=fail, refuse_classes=frozenset({"meter"}))
    settings = settings_for(mosquitto, routes=(THERMOSTAT, METER))
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    await publish_all(
        mosquitto,
        [
            ("devices/a/telemetry", b"flaky"),
            ("sites/main/meters/m", b"refused"),
            ("devices/a/telemetry", b"ok"),
        ],
    )
    await wait_until(lambda: len(read_messages(db)) == 2, 5, "the flaky message to succeed")
    assert sorted(p for *_, p in read_messages(db)) == [b"flaky", b"ok"]
    await wait_until(lambda: bridge.stats.extra["pending"] == 0, 5, "the last ack")
    stats = bridge.stats
    assert stats.extra["retries"] == 3 and stats.rejected >= 1 and stats.extra["pending"] == 0
    await bridge.stop()

    # Everything above was acked (the refusal too): nothing comes back on restart. A barrier
    # message published after the reconnect arrives after anything the broker would resend.
    again = MqttBridge(settings, handler)
    await again.start()
    await again.wait_connected(timeout_s=5)
    await publish_all(mosquitto, [("devices/a/telemetry", b"barrier")])
    await wait_until(lambda: len(read_messages(db)) >= 3, 5, "the barrier message")
    assert sorted(p for *_, p in read_messages(db)) == [b"barrier", b"flaky", b"ok"]
    assert again.stats.rejected == 0
    await again.stop()


async def test_backpressure_bounds_pending_turns_and_keeps_order(
    mosquitto: MosquittoBroker, handler_factory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler = await handler_factory(commit_delay_s=0.005, batch_max=4)
    bridge = MqttBridge(settings_for(mosquitto, max_pending_messages=8), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    payloads = [f"{n:04d}".encode() for n in range(300)]
    await publish_all(mosquitto, [("devices/one/telemetry", p) for p in payloads])
    await wait_until(lambda: len(read_messages(db)) == 300, 15, "all 300 messages")
    assert [p for *_, p in read_messages(db)] == payloads  # arrival order, nothing dropped
    # The open_link event plus at most max_pending_messages messages were ever outstanding.
    assert handler.max_outstanding <= 8 + 1
    assert bridge.stats.extra["backpressure_pauses"] > 0
    assert bridge.stats.extra["incoming_queue_peak"] <= 8 + 5  # bounded, whatever the broker
    await bridge.stop()


async def test_outbound_backlog_keeps_every_reply_while_broker_is_down(
    mosquitto: MosquittoBroker, handler_factory
) -> None:
    handler = await handler_factory()
    settings = settings_for(mosquitto, max_outbound_queue=10, max_inflight_publishes=2)
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    # A device with a persistent session that will receive what was queued for it.
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, identifier="dev-7", clean_session=False
    ) as dev:
        await dev.subscribe("devices/7/cmd", qos=1)
    await publish_all(mosquitto, [("devices/7/telemetry", b"hello")])
    await wait_until(lambda: "mqtt:devices/7/telemetry" in handler.links, 5, "the link to open")
    link = handler.links["mqtt:devices/7/telemetry"]

    mosquitto.stop()
    await wait_until(lambda: not bridge.connected, 5, "the bridge to notice")
    for n in range(50):
        link.send(f"cmd-{n}")
    stats = bridge.stats.extra
    # Over max_outbound_queue nothing is dropped: the backlog holds them (and the bridge
    # stops reading device messages meanwhile, see test_mqtt_outbound.py).
    assert stats["outbound_queued"] + stats["outbound_publishing"] == 50
    assert "outbound_dropped_by_policy" not in stats

    mosquitto.start()
    await bridge.wait_connected(timeout_s=10)
    await wait_until(lambda: bridge.stats.extra["outbound_queued"] == 0, 5, "the queue to flush")
    expected = {f"cmd-{n}".encode() for n in range(50)}
    received = await receive_queued(mosquitto, "dev-7", "devices/7/cmd", expected)
    # At least once: a publish interrupted by the outage may arrive twice, none is missing.
    assert received == expected
    await bridge.stop()


@NATIVE_ONLY
async def test_broker_restart_mid_stream_loses_nothing(
    mosquitto: MosquittoBroker, handler_factory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler = await handler_factory(commit_delay_s=0.03, batch_max=20)
    # A small window keeps most of the stream in the broker, where it must survive the restart.
    bridge = MqttBridge(settings_for(mosquitto, max_pending_messages=20), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    first = [(f"devices/d{n % 7}/telemetry", f"a{n}".encode()) for n in range(500)]
    await publish_all(mosquitto, first)
    await wait_until(lambda: len(read_messages(db)) >= 50, 5, "the stream to start")
    mosquitto.restart()  # graceful: Mosquitto saves the sessions and their queued messages
    assert len(read_messages(db)) < 500, "the restart must happen mid-stream"
    await wait_until(lambda: bridge.stats.extra.get("connects") == 2, 10, "the reconnect")
    second = [(f"devices/d{n % 7}/telemetry", f"b{n}".encode()) for n in range(300)]
    await publish_all(mosquitto, second)
    expected = {p for _, p in first + second}
    await wait_until(lambda: {p for *_, p in read_messages(db)} >= expected, 15, "all messages")
    assert bridge.stats.extra["disconnects"] == 1
    await bridge.stop()


def _start_runner(broker: MosquittoBroker, db: Path, protocol: str) -> Any:
    return asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.protocols.mqtt_bridge_runner",
        "--broker-url",
        broker.url,
        "--client-id",
        "gw-crash",
        "--db",
        str(db),
        "--commit-delay-s",
        "0.05",
        "--max-pending",
        "100",
        "--protocol",
        protocol,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )


async def _wait_ready(process: Any) -> None:
    async with asyncio.timeout(15):
        line = await process.stdout.readline()
    assert line.strip() == b"READY", line


@NATIVE_ONLY
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_sigkill_mid_stream_loses_no_message(
    mosquitto: MosquittoBroker, tmp_path: Path, protocol: str
) -> None:
    db = tmp_path / "agents.sqlite"
    # 1. Create the persistent session, then crash.
    process = await _start_runner(mosquitto, db, protocol)
    await _wait_ready(process)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert await retained(mosquitto, "gatewayd/gw-crash/status") == b"offline"  # last will
    # 2. 1000 QoS 1 messages arrive while the bridge is down: the broker queues them.
    payloads = [f"m{n}".encode() for n in range(1000)]
    await publish_all(
        mosquitto, [(f"devices/d{n % 10}/telemetry", p) for n, p in enumerate(payloads)]
    )
    # 3. The bridge comes back, the broker floods it, and it is SIGKILLed mid-stream.
    process = await _start_runner(mosquitto, db, protocol)
    await _wait_ready(process)
    await wait_until(lambda: len(read_messages(db)) >= 100, 10, "the stream to start")
    process.send_signal(signal.SIGKILL)
    await process.wait()
    applied_before_kill = len(read_messages(db))
    assert applied_before_kill < 1000, "the kill must happen mid-stream"
    # 4. Restarted with the same client id: every message is applied at least once.
    process = await _start_runner(mosquitto, db, protocol)
    try:
        await _wait_ready(process)
        assert await retained(mosquitto, "gatewayd/gw-crash/status") == b"online"
        await wait_until(
            lambda: {p for *_, p in read_messages(db)} == set(payloads), 15, "all 1000"
        )
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    rows = read_messages(db)
    assert len(rows) >= 1000  # at least once: a few may have committed twice around the kill
    assert all(agent_class == "thermostat" for agent_class, *_ in rows)


async def test_resubscribes_when_the_broker_lost_its_sessions(
    tmp_path: Path, handler_factory
) -> None:
    db = tmp_path / "agents.sqlite"
    with MosquittoBroker(tmp_path / "volatile", persistence=False) as broker:
        handler = await handler_factory()
        bridge = MqttBridge(settings_for(broker), handler)
        await bridge.start()
        await bridge.wait_connected(timeout_s=5)
        broker.restart()  # no persistence: the session and its subscription are gone
        await wait_until(lambda: bridge.stats.extra.get("connects") == 2, 10, "the reconnect")
        await publish_all(broker, [("devices/x/telemetry", b"after restart")])
        await wait_until(lambda: len(read_messages(db)) == 1, 5, "the message after restart")
        await bridge.stop()


async def test_fails_over_to_the_next_broker_url(
    mosquitto: MosquittoBroker, handler_factory
) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    handler = await handler_factory()
    bridge = MqttBridge(settings_for(mosquitto, broker_urls=(dead, mosquitto.url)), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    assert bridge.broker == mosquitto.url
    assert bridge.stats.extra["connect_failures"] >= 1
    await bridge.stop()


@NATIVE_ONLY
async def test_qos0_flood_pauses_reading_instead_of_dropping_or_buffering(
    mosquitto: MosquittoBroker, handler_factory, tmp_path: Path
) -> None:
    db = tmp_path / "agents.sqlite"
    handler = await handler_factory(commit_delay_s=0.02, batch_max=5)
    settings = settings_for(mosquitto, qos=0, max_pending_messages=5)
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
        for n in range(300):
            await device.publish("devices/q/telemetry", f"{n}".encode(), qos=0)
    await wait_until(lambda: len(read_messages(db)) == 300, 20, "all 300 QoS 0 messages")
    assert [int(p) for *_, p in read_messages(db)] == list(range(300))  # none dropped, in order
    extra = bridge.stats.extra
    assert extra["read_pauses"] > 0
    assert extra["incoming_queue_peak"] <= 5 + 5, extra  # high water + one socket read
    assert handler.max_outstanding <= 5 + 1
    await bridge.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    directory.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=gatewayd-test-ca", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=gw-tls")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
                 cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext",
                 cwd=directory)  # fmt: skip


async def test_mutual_tls_with_ca_client_cert_and_insecure_flag(
    tmp_path: Path, handler_factory
) -> None:
    pki = tmp_path / "pki"
    _make_pki(pki)
    tls = (
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        "require_certificate true\n"
    )
    with MosquittoBroker(tmp_path / "tls-broker", extra_config=tls) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        handler = await handler_factory()
        base = {"broker_urls": (url,), "connect_timeout_s": 2.0}
        client_cert = {"cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key")}
        verified = MqttBridge(
            settings_for(broker, **base, ca_file=str(pki / "ca.pem"), **client_cert), handler
        )
        await verified.start()
        await verified.wait_connected(timeout_s=5)
        assert verified.broker == url
        await verified.stop()

        # The broker's certificate is not trusted without our CA ...
        untrusted = MqttBridge(settings_for(broker, **base, **client_cert), handler)
        await untrusted.start()
        await wait_until(
            lambda: untrusted.stats.extra.get("connect_failures", 0) >= 1, 10, "a refused handshake"
        )
        assert not untrusted.connected
        await untrusted.stop()

        # ... unless verification is switched off explicitly.
        insecure = MqttBridge(
            settings_for(broker, **base, tls_insecure=True, client_id="gw-insecure", **client_cert),
            handler,
        )
        await insecure.start()
        await insecure.wait_connected(timeout_s=5)
        await insecure.stop()
