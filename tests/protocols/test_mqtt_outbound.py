"""The MQTT bridge's outbound path against a real Mosquitto: replies are never dropped for load
(backpressure on reading instead), tracked replies are reported delivered on the PUBACK, and
the only drops are those of a route that asked for them (`on_overflow = "drop_oldest"`)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from protocols.link import OutputAddress
from protocols.mqtt import MqttBridge, MqttRoute
from tests.brokers import MosquittoBroker
from tests.protocols.test_mqtt import NATIVE_ONLY, publish_all, receive_queued, settings_for
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("mqtt_client")

REPLIES = 8  # per message in the reply flood test: more than the outbound backlog's limit
ECHO = MqttRoute("echo/{id}/in", "echo", "echo/{id}/out", on_overflow="drop_oldest")


async def test_reply_flood_is_never_dropped_and_pauses_reading(
    mosquitto: MosquittoBroker, handler_factory, tmp_path: Path
) -> None:
    # Every message gets `replies` replies at once, more than the outbound backlog's limit
    # (5), so the backlog fills whichever client publishes faster than it reads.
    replies = REPLIES

    def reply(link: Any, data: bytes | str) -> bytes:
        for n in range(1, replies):
            link.send(b"re%d:" % n + bytes(data))  # type: ignore[arg-type]
        return b"re0:" + bytes(data)  # type: ignore[arg-type]

    handler = await handler_factory(reply=reply)
    settings = settings_for(
        mosquitto, max_outbound_queue=5, max_inflight_publishes=1, max_pending_messages=50
    )
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    payloads = [f"{n:05d}".encode() for n in range(2400 // replies)]
    expected = {b"re%d:" % n + p for p in payloads for n in range(replies)}
    received: set[bytes] = set()
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, max_queued_incoming_messages=0
    ) as dev:
        await dev.subscribe("devices/+/cmd", qos=1)
        flood = asyncio.create_task(
            publish_all(
                mosquitto, [(f"devices/d{n % 4}/telemetry", p) for n, p in enumerate(payloads)]
            )
        )
        async with asyncio.timeout(60):
            async for message in dev.messages:
                received.add(bytes(message.payload))
                if len(received) == len(expected):
                    break
        await flood
    assert received == expected
    stats = bridge.stats.extra
    assert stats["outbound_backpressure_pauses"] > 0  # the backlog limit was reached...
    assert "outbound_dropped_by_policy" not in stats  # ...and nothing was dropped for it
    # Backpressure reached the socket: what waits unread in memory stays bounded (replies'
    # PUBACKs come on their own connection, so pausing the device connection is safe).
    assert stats["incoming_queue_peak"] <= 50 + 5
    await bridge.stop()


async def test_tracked_reply_is_delivered_only_after_the_broker_has_it(
    mosquitto: MosquittoBroker, handler_factory
) -> None:
    handler = await handler_factory()
    # The broker stops here while the replies' connection may still be connecting: that
    # connect fails at once (not after connect_timeout_s, 10 s: aiomqtt waited it out and
    # the replies below came 10 s late, 2 runs in ~30), so the default settings serve.
    bridge = MqttBridge(settings_for(mosquitto), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, identifier="dev-9", clean_session=False
    ) as dev:
        await dev.subscribe("devices/9/cmd", qos=1)
    mosquitto.stop()
    await wait_until(lambda: not bridge.connected, 5, "the bridge to notice")

    delivered: list[int] = []
    all_delivered = asyncio.get_running_loop().create_future()

    def on_delivered(seq: int) -> None:
        delivered.append(seq)
        if len(delivered) == 3:
            all_delivered.set_result(None)

    for seq in (11, 12, 13):
        bridge.send_tracked(
            OutputAddress("mqtt", "devices/9/cmd", 1), seq, b"c%d" % seq, on_delivered
        )
    assert delivered == []  # no broker, no PUBACK: nothing may count as delivered

    mosquitto.start()
    async with asyncio.timeout(5):
        await all_delivered
    assert sorted(delivered) == [11, 12, 13]
    await receive_queued(mosquitto, "dev-9", "devices/9/cmd", {b"c11", b"c12", b"c13"})
    await bridge.stop()


async def test_drop_oldest_route_drops_counts_and_reports_its_oldest_replies(
    mosquitto: MosquittoBroker, handler_factory
) -> None:
    handler = await handler_factory()
    settings = settings_for(
        mosquitto, routes=(ECHO,), max_outbound_queue=10, max_inflight_publishes=1
    )
    bridge = MqttBridge(settings, handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    mosquitto.stop()
    await wait_until(lambda: not bridge.connected, 5, "the bridge to notice")
    delivered: list[int] = []
    for seq in range(1, 31):
        bridge.send_tracked(OutputAddress("mqtt", "echo/x/out", 1), seq, b"e", delivered.append)
    stats = bridge.stats.extra
    # No await in between, so the publisher took none yet: ten are queued, the 20 oldest
    # went, each reported as done so that the gateway does not send it again after a restart.
    assert stats["outbound_dropped_by_policy"] == 20
    assert delivered == list(range(1, 21))
    assert stats["outbound_queued"] == 10
    # A drop_oldest route never makes the bridge stop reading device messages.
    assert "outbound_backpressure_pauses" not in stats and bridge._has_capacity()
    mosquitto.start()
    await bridge.wait_connected(timeout_s=10)
    await wait_until(lambda: len(delivered) == 30, 10, "the rest to be published")
    await bridge.stop()


async def test_a_reply_caught_by_a_dying_connection_goes_out_on_the_next_one_at_once(
    mosquitto: MosquittoBroker, handler_factory
) -> None:
    # aiomqtt keeps a QoS 1 publish waiting for its PUBACK until the publish timeout even after
    # the connection died; the bridge must instead republish as soon as it has a new one.
    handler = await handler_factory()
    bridge = MqttBridge(settings_for(mosquitto, publish_timeout_s=120.0), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    outbound = bridge._outbound_connection
    await wait_until(lambda: outbound.client is not None, 5, "the replies' connection")
    assert mosquitto._process is not None
    os.kill(mosquitto._process.pid, signal.SIGSTOP)  # takes the PUBLISH, never answers it
    delivered = asyncio.get_running_loop().create_future()
    bridge.send_tracked(
        OutputAddress("mqtt", "devices/7/cmd", 1), 1, b"late", lambda seq: delivered.set_result(seq)
    )
    await wait_until(lambda: bridge._publisher.publishing == 1, 5, "the publish to be in flight")
    mosquitto.kill()  # its sockets close: the bridge sees the connection end
    mosquitto.start()
    async with asyncio.timeout(30):  # well under the 120 s publish timeout
        assert await delivered == 1
    await bridge.stop()


async def test_a_reply_without_puback_in_publish_timeout_is_published_again(
    mosquitto: MosquittoBroker, handler_factory
) -> None:
    # The bridge tracks its own PUBLISHes (one future per reply, ManualAckClient.publish_nowait);
    # a PUBACK that does not come within publish_timeout means: publish again, and count it.
    handler = await handler_factory()
    bridge = MqttBridge(settings_for(mosquitto, publish_timeout_s=0.5), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    outbound = bridge._outbound_connection
    await wait_until(lambda: outbound.client is not None, 5, "the replies' connection")
    assert mosquitto._process is not None
    os.kill(mosquitto._process.pid, signal.SIGSTOP)
    delivered: list[int] = []
    try:
        bridge.send_tracked(OutputAddress("mqtt", "devices/8/cmd", 1), 1, b"slow", delivered.append)
        await wait_until(
            lambda: bridge.stats.extra.get("publish_retries", 0) >= 1, 10, "a timed-out publish"
        )
        assert delivered == []
    finally:
        os.kill(mosquitto._process.pid, signal.SIGCONT)
    await wait_until(lambda: delivered == [1], 15, "the reply to be acknowledged")
    assert not outbound.client._acked  # no PUBACK left tracked
    await bridge.stop()
    assert delivered == [1]


async def test_replies_are_published_at_once_without_a_task_each(
    mosquitto: MosquittoBroker, handler_factory
) -> None:
    # A reply queued while the in-flight window has room goes to the client in the same
    # call, and its PUBACK's callback reports it: no worker coroutine or task per reply (an
    # awaiting worker cost a wait, a timer and two resumptions per reply).
    handler = await handler_factory()
    bridge = MqttBridge(settings_for(mosquitto, max_inflight_publishes=32), handler)
    await bridge.start()
    await bridge.wait_connected(timeout_s=5)
    outbound = bridge._outbound_connection
    await wait_until(lambda: outbound.client is not None, 5, "the replies' connection")
    tasks_before = len(asyncio.all_tasks())
    delivered: list[int] = []
    for seq in range(1, 41):
        bridge.send_tracked(OutputAddress("mqtt", "devices/9/cmd", 1), seq, b"r", delivered.append)
    # Synchronously: the first 32 are with the client, the other 8 wait for room.
    assert bridge._publisher.publishing == 32
    assert len(bridge._publisher.queue) == 8
    assert len(asyncio.all_tasks()) == tasks_before
    await wait_until(lambda: delivered == list(range(1, 41)), 10, "every reply")
    assert bridge._publisher.publishing == 0 and bridge._publisher.idle.is_set()
    await bridge.stop()


@NATIVE_ONLY  # paho does not hand the PUBACK's reason code over
async def test_a_reply_the_broker_refuses_is_counted_and_logged_not_retried_forever(
    tmp_path: Path, handler_factory, caplog: pytest.LogCaptureFixture
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite devices/#\ntopic readwrite gatewayd/#\n")  # not forbidden/#
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config=f"acl_file {acl}")
    broker.start()
    try:
        handler = await handler_factory(reply=lambda link, data: b"re:" + bytes(data))  # type: ignore[arg-type]
        route = MqttRoute("devices/{id}/telemetry", "thermostat", "forbidden/{id}/cmd")
        bridge = MqttBridge(settings_for(broker, protocol="5", routes=(route,)), handler)
        await bridge.start()
        await bridge.wait_connected(timeout_s=5)
        await publish_all(broker, [("devices/d1/telemetry", b"m1")])
        await wait_until(
            lambda: bridge.stats.extra.get("publish_refused") == 1, 5, "the refused reply"
        )
        await wait_until(lambda: bridge._publisher.publishing == 0, 5, "the publish to finish")
        assert "MQTT 5 reason 0x87" in caplog.text
        assert "publish_retries" not in bridge.stats.extra
        await bridge.stop()
    finally:
        broker.stop()
