"""The MQTT bridge's Prometheus metrics (one set per process, over every live bridge).
Never imports gatewayd.

The series counted per message (`gatewayd_mqtt_events_total`, `gatewayd_mqtt_published_total`)
are plain integers bumped on the event loop thread and read by a collector when the registry
is scraped: a `Counter.inc()` takes a lock, three times per message."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from protocols.mqtt import MqttBridge

__all__ = ["EVENT_TOTALS", "LIVE_BRIDGES", "count_event", "count_published"]

LIVE_BRIDGES: weakref.WeakSet[MqttBridge] = weakref.WeakSet()

# gatewayd_mqtt_events_total{event}, gatewayd_mqtt_published_total (event loop thread only).
EVENT_TOTALS: dict[str, int] = {}
_PUBLISHED = [0]


class _Collector(Collector):
    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "gatewayd_mqtt_events",
            "MQTT bridge events: applied, acked, rejected, retries, dead_lettered, backpressure, "
            "not_allowed, new_agent_refused, links_evicted, unrouted, oversized, "
            "retained_skipped, read_pauses, outbound_backpressure_pauses, "
            "outbound_dropped_by_policy, connects, disconnects, ...",
            labels=["event"],
        )
        for name, value in list(EVENT_TOTALS.items()):
            events.add_metric([name], value)
        yield events
        yield CounterMetricFamily(
            "gatewayd_mqtt_published", "Replies published to the broker", value=_PUBLISHED[0]
        )


REGISTRY.register(_Collector())
MQTT_CONNECTED = Gauge("gatewayd_mqtt_connected", "MQTT bridges connected to their broker")
MQTT_CONNECTED.set_function(lambda: sum(b.connected for b in list(LIVE_BRIDGES)))
MQTT_PENDING = Gauge("gatewayd_mqtt_pending_messages", "MQTT messages awaiting their commit")
MQTT_PENDING.set_function(lambda: sum(b._pending for b in list(LIVE_BRIDGES)))


def count_event(name: str, n: int = 1) -> None:
    """`gatewayd_mqtt_events_total{event=name} += n` (event loop thread)."""
    EVENT_TOTALS[name] = EVENT_TOTALS.get(name, 0) + n


def count_published() -> None:
    """`gatewayd_mqtt_published_total += 1` (event loop thread)."""
    _PUBLISHED[0] += 1
