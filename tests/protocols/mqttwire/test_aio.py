"""`MqttClient` against a real Mosquitto: manual acks, session resume, QoS 1 resend with DUP
after a broker crash, keepalive, MQTT 5 session expiry and TLS. The broker's debug log (what
it received and sent, with the DUP flag) is the witness."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols.mqttwire.aio import ConnectionLostError, MqttClient, MqttError
from protocols.mqttwire.connection import ConnectOptions
from tests.brokers import MosquittoBroker, free_port
from tests.certificates import self_signed
from tests.waiting import wait_until

TIMEOUT_S = 5.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config="log_type debug")
    broker.start()
    try:
        yield broker
    finally:
        if broker._process is not None:
            os.kill(broker._process.pid, signal.SIGCONT)  # in case a test left it stopped
        broker.stop()


def _log(broker: MosquittoBroker) -> str:
    return broker.log_path.read_text(errors="replace")


def _client(broker: MosquittoBroker, client_id: str, **options: object) -> MqttClient:
    return MqttClient(
        broker.host,
        broker.port,
        ConnectOptions(client_id, **options),  # type: ignore[arg-type]
        connect_timeout_s=TIMEOUT_S,
    )


async def _receive(client: MqttClient):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(client.receive(), TIMEOUT_S)


async def test_nothing_is_acked_before_ack_and_an_unacked_message_comes_back_with_dup(broker):
    sub = _client(broker, "sub", clean_start=False)
    await sub.connect()
    assert await sub.subscribe("d/#", qos=1, timeout=TIMEOUT_S) == [1]
    async with _client(broker, "pub") as pub:
        assert await pub.publish("d/1", b"m1", qos=1, timeout=TIMEOUT_S) == 0
    message = await _receive(sub)
    assert (message.topic, message.payload, message.qos, message.dup) == ("d/1", b"m1", 1, False)
    assert "Sending PUBLISH to sub (d0, q1" in _log(broker)
    assert "Received PUBACK from sub" not in _log(broker)  # the "commit" has not happened

    await sub.disconnect()  # without acking: the persistent session keeps the message
    connack = await sub.connect()
    assert connack.session_present
    again = await _receive(sub)
    assert (again.payload, again.dup) == (b"m1", True)
    assert sub.ack(again.packet_id, again.qos)
    await wait_until(lambda: "Received PUBACK from sub" in _log(broker), TIMEOUT_S, "sub's PUBACK")
    await sub.disconnect()
    assert not sub.ack(again.packet_id, 1)  # its connection is gone


async def test_a_qos1_publish_lost_in_a_broker_crash_is_resent_with_dup_after_the_restart(broker):
    watcher = _client(broker, "watcher", clean_start=False)
    await watcher.connect()
    await watcher.subscribe("r/#", qos=1, timeout=TIMEOUT_S)
    pub = _client(broker, "pub", clean_start=False)
    await pub.connect()
    # A graceful restart saves both sessions; the crash below then loses nothing but the publish.
    broker.restart()
    await wait_until(lambda: pub.disconnected.done(), TIMEOUT_S, "pub to see the restart")
    assert (await pub.connect()).session_present
    assert (await watcher.connect()).session_present

    assert broker._process is not None
    os.kill(broker._process.pid, signal.SIGSTOP)  # the PUBLISH reaches the kernel, not Mosquitto
    packet_id, done = pub.publish_nowait("r/1", b"x", qos=1)
    await wait_until(lambda: not pub._flush_scheduled, TIMEOUT_S, "the PUBLISH written")
    broker.kill()
    await wait_until(lambda: pub.disconnected.done(), TIMEOUT_S, "pub to see the crash")
    assert not done.done() and pub.connection.inflight_ids == [packet_id]
    broker.start()
    assert (await watcher.connect()).session_present
    assert (await pub.connect()).session_present
    assert await asyncio.wait_for(done, TIMEOUT_S) == 0  # the resend's PUBACK
    assert f"Received PUBLISH from pub (d1, q1, r0, m{packet_id}, 'r/1'" in _log(broker)
    message = await _receive(watcher)
    assert (message.topic, message.payload) == ("r/1", b"x")
    await pub.disconnect()
    await watcher.disconnect()


async def test_keepalive_pings_and_a_silent_broker_ends_the_connection(broker):
    client = _client(broker, "ka", keepalive=1)
    await client.connect()
    await wait_until(
        lambda: (
            "Sending PINGRESP to ka" in _log(broker) and not client.connection.pings_outstanding
        ),
        TIMEOUT_S,
        "a PINGREQ answered",
    )
    assert broker._process is not None
    os.kill(broker._process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ConnectionLostError, match="keepalive timeout"):
            await asyncio.wait_for(asyncio.shield(client.disconnected), TIMEOUT_S)
    finally:
        os.kill(broker._process.pid, signal.SIGCONT)
    assert not client.is_connected


async def test_mqtt5_session_expiry_decides_whether_the_session_survives(broker):
    keeps = _client(
        broker,
        "v5-keeps",
        version=5,
        clean_start=False,
        properties={"session_expiry_interval": 300},
    )
    await keeps.connect()
    await keeps.subscribe("s/#", qos=1, timeout=TIMEOUT_S)
    await keeps.disconnect()
    async with _client(broker, "pub5", version=5) as pub:
        await pub.publish("s/1", b"while away", qos=1, timeout=TIMEOUT_S)
    assert (await keeps.connect()).session_present
    message = await _receive(keeps)
    assert message.payload == b"while away" and keeps.ack(message.packet_id, 1)
    await keeps.disconnect()

    ends = _client(
        broker, "v5-ends", version=5, clean_start=False, properties={"session_expiry_interval": 0}
    )
    await ends.connect()
    await ends.subscribe("s/#", qos=1, timeout=TIMEOUT_S)
    await ends.disconnect()
    assert not (await ends.connect()).session_present
    await ends.disconnect()


async def test_tls_with_a_self_signed_certificate(tmp_path: Path):
    cert, key = self_signed(tmp_path)
    tls_port = free_port()
    broker = MosquittoBroker(
        tmp_path / "mosquitto",
        extra_config=f"listener {tls_port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}",
    )
    broker.start()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        options = ConnectOptions("tls", version=5)
        async with MqttClient("127.0.0.1", tls_port, options, ssl_context=context) as client:
            await client.subscribe("t/#", qos=1, timeout=TIMEOUT_S)
            await client.publish("t/1", b"secret", qos=1, timeout=TIMEOUT_S)
            message = await _receive(client)
            assert message.payload == b"secret"
            assert client._transport is not None
            assert client._transport.get_extra_info("ssl_object") is not None
        untrusting = MqttClient(
            "127.0.0.1", tls_port, ConnectOptions("x"), ssl_context=ssl.create_default_context()
        )
        with pytest.raises(MqttError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.connect()
    finally:
        broker.stop()


async def test_publish_tracked_calls_back_on_each_puback_even_when_a_callback_reuses_an_id(broker):
    """Both PUBACKs arrive in one read; A's callback publishes C, which takes B's packet id
    (freed by B's PUBACK in that same read, as after a wrap-around of the ids). B's callback
    must still be B's, and C's must wait for C's own PUBACK."""
    pub = _client(broker, "pub")
    await pub.connect()
    acked: list[tuple[str, int]] = []
    ids: dict[str, int] = {}

    def on_a(code: int) -> None:
        acked.append(("a", code))
        pub.connection._next_id = ids["b"]  # the next publish takes B's (just freed) id
        ids["c"] = pub.publish_tracked("r/c", b"c", 1, lambda code: acked.append(("c", code)))

    assert pub._transport is not None
    pub._transport.pause_reading()  # both PUBACKs wait in the socket: one read gets them
    ids["a"] = pub.publish_tracked("r/a", b"a", 1, on_a)
    ids["b"] = pub.publish_tracked("r/b", b"b", 1, lambda code: acked.append(("b", code)))
    await wait_until(
        lambda: f"Sending PUBACK to pub (m{ids['b']}" in _log(broker), TIMEOUT_S, "both PUBACKs"
    )
    pub._transport.resume_reading()
    await wait_until(lambda: len(acked) >= 2, TIMEOUT_S, "the PUBACKs of A and B")
    assert acked[:2] == [("a", 0), ("b", 0)]
    assert ids["c"] == ids["b"]
    await wait_until(lambda: len(acked) == 3, TIMEOUT_S, "C's own PUBACK")
    assert acked[2] == ("c", 0)
    assert f"Received PUBLISH from pub (d0, q1, r0, m{ids['c']}, 'r/c'" in _log(broker)
    pub.forget_publish(0)  # nothing to forget: harmless
    await pub.disconnect()


async def test_forget_publish_drops_a_tracked_publish_callback(broker):
    pub = _client(broker, "pub")
    await pub.connect()
    acked: list[int] = []
    assert broker._process is not None
    os.kill(broker._process.pid, signal.SIGSTOP)  # no PUBACK until it is forgotten
    try:
        packet_id = pub.publish_tracked("r/1", b"x", 1, acked.append)
        pub.forget_publish(packet_id)
    finally:
        os.kill(broker._process.pid, signal.SIGCONT)
    assert pub.publish_tracked("r/0", b"y", 0, acked.append) == 0  # QoS 0: no callback
    marker = pub.publish_tracked("r/2", b"z", 1, acked.append)
    await wait_until(lambda: acked == [0], TIMEOUT_S, "the PUBACK of the second QoS 1 publish")
    assert packet_id != marker and not pub._ack_callbacks
    await pub.disconnect()
