"""ManualAckClient's write coalescing: which queued paho packets may share one send()."""

from __future__ import annotations

from collections import deque
from typing import Any

import paho.mqtt.client as paho

from protocols.mqtt_client import coalesce_out_packets


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
