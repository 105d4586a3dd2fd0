"""The MQTT bridge's Prometheus metrics (one set per process, over every live bridge).
Never imports gatewayd."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

if TYPE_CHECKING:
    from protocols.mqtt import MqttBridge

__all__ = ["LIVE_BRIDGES", "MQTT_EVENTS", "MQTT_PUBLISHED", "count_event"]

LIVE_BRIDGES: weakref.WeakSet[MqttBridge] = weakref.WeakSet()

MQTT_EVENTS = Counter(
    "gatewayd_mqtt_events_total",
    "MQTT bridge events: applied, acked, rejected, retries, dead_lettered, backpressure, "
    "not_allowed, new_agent_refused, links_evicted, unrouted, oversized, retained_skipped, "
    "read_pauses, outbound_backpressure_pauses, outbound_dropped_by_policy, connects, "
    "disconnects, ...",
    ["event"],
)
_EVENT_CHILDREN: dict[str, Any] = {}  # labels() takes a lock and a dict lookup: cache children
MQTT_PUBLISHED = Counter("gatewayd_mqtt_published_total", "Replies published to the broker")
MQTT_CONNECTED = Gauge("gatewayd_mqtt_connected", "MQTT bridges connected to their broker")
MQTT_CONNECTED.set_function(lambda: sum(b.connected for b in list(LIVE_BRIDGES)))
MQTT_PENDING = Gauge("gatewayd_mqtt_pending_messages", "MQTT messages awaiting their commit")
MQTT_PENDING.set_function(lambda: sum(b._pending for b in list(LIVE_BRIDGES)))


def count_event(name: str, n: int = 1) -> None:
    """`gatewayd_mqtt_events_total{event=name} += n`."""
    child = _EVENT_CHILDREN.get(name)
    if child is None:
        child = _EVENT_CHILDREN[name] = MQTT_EVENTS.labels(name)
    child.inc(n)
