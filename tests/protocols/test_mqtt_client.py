"""ManualAckClient: write coalescing (which queued paho packets may share one send()), and a
connection lost before the CONNACK failing the connect at once."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest

from protocols.mqtt import MqttRoute
from protocols.mqtt_client import coalesce_out_packets, outbound_client
from protocols.mqtt_settings import BrokerAddress, MqttSettings


def _packet(command: int, data: bytes, qos: int = 1, pos: int = 0) -> dict[str, Any]:
    return {
        "command": command,
        "mid": 1,
        "qos": qos,
        "pos": pos,
        "to_process": len(data) - pos,
        "packet": bytearray(data),
        "info": object(),
    }


def _wire(packets: deque[Any]) -> bytes:
    return b"".join(bytes(p["packet"][p["pos"] :]) for p in packets)


def test_runs_of_plain_packets_merge_in_order_and_side_effect_packets_stay_alone():
    qos0 = _packet(paho.PUBLISH | 0x00, b"Q0", qos=0)
    disconnect = _packet(paho.DISCONNECT, b"\xe0\x00", qos=0)
    started = _packet(paho.PUBLISH | 0x02, b"xxPARTIAL", pos=2)  # half sent already
    packets = deque(
        [
            started,
            _packet(paho.PUBACK, b"A1"),
            _packet(paho.PUBLISH | 0x02, b"P1"),
            _packet(paho.PUBACK, b"A2"),
            qos0,
            _packet(paho.PUBACK, b"A3"),
            disconnect,
        ]
    )
    before = _wire(packets)
    coalesce_out_packets(packets)
    assert _wire(packets) == before  # same bytes, same order
    assert [p["packet"] for p in packets] == [
        bytearray(b"xxPARTIAL"),
        b"A1P1A2",
        bytearray(b"Q0"),
        bytearray(b"A3"),
        bytearray(b"\xe0\x00"),
    ]
    assert packets[0] is started and packets[2] is qos0 and packets[4] is disconnect
    merged = packets[1]
    assert merged["command"] & 0xF0 == paho.PUBACK and merged["info"] is None
    assert merged["to_process"] == 6 and merged["pos"] == 0


def test_nothing_to_merge_leaves_the_queue_alone():
    single = deque([_packet(paho.PUBACK, b"A1")])
    first = single[0]
    coalesce_out_packets(single)
    assert list(single) == [first]
    empty: deque[Any] = deque()
    coalesce_out_packets(empty)
    assert not empty


async def test_a_connection_lost_before_the_connack_fails_the_connect_at_once() -> None:
    """A broker that takes the CONNECT and goes away (a restart at that moment): the connect
    fails when the connection drops, not after `connect_timeout_s` (aiomqtt waited it out:
    replies were held back 10 s). A real socket and a real paho client."""
    connects: list[bytes] = []

    async def take_connect_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        connects.append(await reader.read(1024))
        writer.close()

    server = await asyncio.start_server(take_connect_and_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = MqttSettings(
        broker_urls=(f"mqtt://127.0.0.1:{port}",),
        routes=(MqttRoute("devices/{id}/up", "thermostat", "devices/{id}/down"),),
        connect_timeout_s=10.0,
    )
    client = outbound_client(settings, BrokerAddress("127.0.0.1", port, False), None, "gw-out")
    started = time.monotonic()
    try:
        with pytest.raises(aiomqtt.MqttError, match="before the broker's CONNACK"):
            async with asyncio.timeout(5):
                async with client:
                    pass
    finally:
        server.close()
        await server.wait_closed()
    assert connects and connects[0][0] >> 4 == 1  # it was an MQTT CONNECT
    assert time.monotonic() - started < 3
