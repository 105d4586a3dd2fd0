"""The MQTT bridge's reply backlog: one FIFO of replies (`Outbound`), published on the
replies' connection with at most `max_inflight_publishes` awaiting their PUBACK, with each
route's overflow policy. Never imports gatewayd.

Publishing costs no task and no coroutine per reply: a reply queued while there is room in
the in-flight window goes to the client at once, and its PUBACK reports it delivered and
publishes the next queued one. The native client (`MqttClient.publish_tracked`) calls back
from the read that brought the PUBACK, with no future per reply; paho's (`publish_nowait`)
completes a future whose done callback does it (one more loop callback per reply). With the
at-once path in `enqueue`, that measured ~10% less gateway CPU per message than futures
(bench/results/mqtt-cpu-2026-12-01.md). One timer per connection
(not one per reply) finds publishes without a PUBACK after `publish_timeout_s`; the
connection's `disconnected` future's callback puts the publishes it took back at the head of
the backlog, for the next connection. (Workers awaiting `asyncio.wait` on each publish cost a
wait, a timer and two coroutine resumptions per reply: ~15% of the daemon's loop under load.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from protocols.mqtt_client import CLIENT_ERRORS, BridgeClient
from protocols.mqtt_metrics import count_published
from protocols.mqtt_outbound import OUTBOUND_CLIENT_SUFFIX, Outbound

if TYPE_CHECKING:
    from protocols.mqtt import MqttBridge

__all__ = ["ReplyPublisher"]

logger = logging.getLogger("protocols.mqtt")  # the bridge's logger: one name for operators

REPLY_ROUTES_CACHED = 10_000  # reply topics whose route `reply_route` remembers


class ReplyPublisher:
    """Replies wait in `queue` (FIFO) until there is room among the `max_inflight_publishes`
    publishes awaiting their PUBACK on the replies' connection (`connected(client)` says
    which one). Nothing is dropped for load: the bridge stops reading device messages while
    `blocking_queued` reaches `max_outbound_queue`; a route with `on_overflow = "drop_oldest"`
    drops its own oldest reply instead."""

    def __init__(self, bridge: MqttBridge) -> None:
        self._bridge = bridge
        self.settings = bridge.settings
        self.queue: deque[Outbound] = deque()
        self.publishing = 0  # publishes handed to the client, not yet acknowledged
        self.idle = asyncio.Event()  # set while nothing is queued or publishing
        self.idle.set()
        self._queued_by_route: dict[int | None, int] = {}
        self.blocking_queued = 0  # queued replies of routes that push back (not drop_oldest)
        self._client: BridgeClient | None = None  # the replies' connection, while it lasts
        # Publishes awaiting their PUBACK on `_client`, oldest first, by their future (not by
        # packet id: the client frees an id on its PUBACK, before the future's callback runs,
        # and may give it to the next publish meanwhile): (reply, packet id, loop time by
        # which its PUBACK is due).
        # With a client that has `publish_tracked` (the native one), keyed by the reply itself
        # (its PUBACK calls back without a future): (reply, packet id, due).
        self._in_flight: dict[Any, tuple[Outbound, int, float]] = {}
        self._tracked: Any = None  # the client's `publish_tracked`, if it has one
        self._timeouts: asyncio.TimerHandle | None = None
        self._paused: asyncio.TimerHandle | None = None  # after a failed publish: wait a little
        self._pumping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reply_routes: dict[str, int | None] = {}  # recent reply topics' routes

    def reply_route(self, topic: str) -> int | None:
        """The route whose reply topic `topic` is (for its overflow policy), None if none."""
        try:
            return self._reply_routes[topic]
        except KeyError:
            pass
        found = self._reply_route(topic)
        if len(self._reply_routes) >= REPLY_ROUTES_CACHED:
            self._reply_routes.clear()  # agents pick the topics: keep the memory bounded
        self._reply_routes[topic] = found
        return found

    def _reply_route(self, topic: str) -> int | None:
        for index, route in enumerate(self.settings.routes):
            head, _, tail = route.reply_topic.partition("{id}")
            if topic.startswith(head) and topic.endswith(tail) and len(topic) > len(head + tail):
                return index
        return None

    # -- the backlog ------------------------------------------------------------------------

    def enqueue(self, item: Outbound) -> None:
        if len(item.payload) > self.settings.max_payload_bytes:
            self._bridge._count("outbound_oversized")
            logger.error(
                "mqtt: a %d-byte reply to %r is over max_payload_bytes=%d and can never be "
                "published; dropped (make the agent send less, or raise the limit)",
                len(item.payload),
                item.topic,
                self.settings.max_payload_bytes,
            )
            item.delivered()
            return
        client = self._client
        if (
            not self.queue
            and client is not None
            and self.publishing < self.settings.max_inflight_publishes
            and self._paused is None
            and not self._pumping
            and not client.disconnected.done()
        ):
            # Nothing queued ahead of it and room in the window: what `_pump` would do at
            # once, without the backlog's bookkeeping (the usual case: one reply per turn).
            self.idle.clear()
            self._publish(client, item)
            self._settle_idle()
            return
        drops = self._drops_oldest(item.route_index)
        if drops and self._queued_by_route.get(item.route_index, 0) >= (
            self.settings.max_outbound_queue
        ):
            self._drop_oldest_of(item.route_index)
        self.queue.append(item)
        self._queued(item)
        self.idle.clear()
        self._pump()

    def _queued(self, item: Outbound) -> None:
        self._queued_by_route[item.route_index] = self._queued_by_route.get(item.route_index, 0) + 1
        if not self._drops_oldest(item.route_index):
            self.blocking_queued += 1

    def _drops_oldest(self, route_index: int | None) -> bool:
        return (
            route_index is not None
            and self.settings.routes[route_index].on_overflow == "drop_oldest"
        )

    def _dequeued(self, item: Outbound) -> None:
        self._queued_by_route[item.route_index] -= 1
        if not self._drops_oldest(item.route_index):
            self.blocking_queued -= 1

    def _requeue(self, items: list[Outbound]) -> None:
        """Publishes that did not go through: back at the head of the backlog, in order."""
        for item in reversed(items):
            self.queue.appendleft(item)
            self._queued(item)
        if items:
            self.idle.clear()

    def _drop_oldest_of(self, route_index: int | None) -> None:
        """A "drop_oldest" route's backlog is at max_outbound_queue: its oldest reply goes.
        (Routes with the default policy are never dropped: the read loop stops instead.)"""
        for queued in self.queue:
            if queued.route_index == route_index:
                self.queue.remove(queued)
                self._dequeued(queued)
                self._bridge._count("outbound_dropped_by_policy")
                self._bridge._log_limited(
                    "outbound_dropped_by_policy",
                    "mqtt: %d replies queued for route %r (max_outbound_queue); dropped the "
                    'oldest, to %r, as its on_overflow = "drop_oldest" says',
                    self.settings.max_outbound_queue,
                    self.settings.routes[route_index].topic if route_index is not None else "?",
                    queued.topic,
                )
                queued.delivered()
                return

    def _settle_idle(self) -> None:
        if not self.queue and self.publishing == 0:
            self.idle.set()

    # -- the replies' connection --------------------------------------------------------------

    def connected(self, client: BridgeClient) -> None:
        """The replies' connection is up (`OutboundConnection`): publish the backlog on it."""
        self._loop = asyncio.get_running_loop()
        if self._client is not None and self._client is not client:
            self._lost(self._client)  # (its callback has not run yet)
        self._client = client
        self._tracked = getattr(client, "publish_tracked", None)
        client.disconnected.add_done_callback(functools.partial(self._lost, client))
        self._pump()

    def _lost(self, client: BridgeClient, _disconnected: Any = None) -> None:
        """`client`'s connection is gone: its publishes without a PUBACK go again, first, on
        the next connection (at least once)."""
        if client is not self._client:
            return
        self._client = None
        if self._timeouts is not None:
            self._timeouts.cancel()
            self._timeouts = None
        items = [item for item, _mid, _due in self._in_flight.values()]
        for _item, mid, _due in self._in_flight.values():
            client.forget_publish(mid)
        self._in_flight.clear()
        self.publishing -= len(items)
        if items:
            self._bridge._count("publish_retries", len(items))
            self._bridge._log_limited(
                "publish_retry",
                "mqtt: the replies' connection was lost with %d publishes (first to %r) "
                "without a PUBACK; publishing them again on the next connection",
                len(items),
                items[0].topic,
            )
        self._requeue(items)
        self._settle_idle()

    def close(self) -> None:
        """The bridge stopped: no more timers (what is queued stays queued)."""
        for timer in (self._timeouts, self._paused):
            if timer is not None:
                timer.cancel()
        self._timeouts = self._paused = None

    # -- publishing ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand queued replies to the client while the in-flight window has room."""
        client = self._client
        if client is None or self._paused is not None or self._pumping:
            return
        if client.disconnected.done():
            self._lost(client)  # (its callback has not run yet)
            return
        limit = self.settings.max_inflight_publishes
        dequeued = False
        self._pumping = True
        try:
            while (
                self.queue
                and self.publishing < limit
                and self._client is client
                and self._paused is None
            ):
                item = self.queue.popleft()
                self._dequeued(item)
                dequeued = True
                self._publish(client, item)
        finally:
            self._pumping = False
        if dequeued:
            self._bridge._wakeup.set()  # the read loop may be waiting for outbound room
        self._settle_idle()

    def _publish(self, client: BridgeClient, item: Outbound) -> None:
        tracked = self._tracked
        if tracked is not None:
            self._publish_tracked(client, tracked, item)
            return
        try:
            mid, published = client.publish_nowait(item.topic, item.payload, item.qos)
        except CLIENT_ERRORS as exc:
            # The client cannot take it now (e.g. paho between a loss and its report).
            self._retry_later([item], f"publish to {item.topic!r} failed ({exc})")
            return
        except Exception as exc:  # e.g. a topic the client refuses: it can never be sent
            self._unpublishable(item, exc)
            return
        self.publishing += 1
        if published.done():  # QoS 0: written
            self._finish(item, published)
            return
        assert self._loop is not None
        due = self._loop.time() + self.settings.publish_timeout_s
        self._in_flight[published] = (item, mid, due)
        published.add_done_callback(functools.partial(self._acknowledged, client))
        if self._timeouts is None:
            self._timeouts = self._loop.call_at(due, self._check_timeouts)

    def _publish_tracked(self, client: BridgeClient, tracked: Any, item: Outbound) -> None:
        """`_publish` on a client with `publish_tracked`: no future, the PUBACK calls
        `_puback` directly (no future, no callback scheduled on the loop per reply)."""
        try:
            mid = tracked(
                item.topic, item.payload, item.qos, functools.partial(self._puback, client, item)
            )
        except CLIENT_ERRORS as exc:
            self._retry_later([item], f"publish to {item.topic!r} failed ({exc})")
            return
        except Exception as exc:
            self._unpublishable(item, exc)
            return
        self.publishing += 1
        if not item.qos:  # QoS 0: written
            self._delivered(item, 0)
            return
        assert self._loop is not None
        due = self._loop.time() + self.settings.publish_timeout_s
        self._in_flight[item] = (item, mid, due)
        if self._timeouts is None:
            self._timeouts = self._loop.call_at(due, self._check_timeouts)

    def _puback(self, client: BridgeClient, item: Outbound, code: int) -> None:
        if client is not self._client or self._in_flight.pop(item, None) is None:
            return  # lost or timed out meanwhile: it was put back in the backlog
        self._delivered(item, code)

    def _unpublishable(self, item: Outbound, exc: Exception) -> None:
        self._bridge._count("publish_errors")
        logger.error(
            "mqtt: cannot publish to %r (%r); reply dropped (check the route's "
            "reply_topic and the agent id)",
            item.topic,
            exc,
        )
        item.delivered()

    def _acknowledged(self, client: BridgeClient, published: asyncio.Future[Any]) -> None:
        if client is not self._client:
            return  # lost meanwhile: it was put back in the backlog
        entry = self._in_flight.pop(published, None)
        if entry is None:
            return  # timed out meanwhile: it was put back in the backlog
        self._finish(entry[0], published)

    def _finish(self, item: Outbound, published: asyncio.Future[Any]) -> None:
        error = None if published.cancelled() else published.exception()
        if published.cancelled() or error is not None:
            self.publishing -= 1
            self._retry_later([item], f"publish to {item.topic!r} failed ({error!r})")
            return
        self._delivered(item, published.result())  # MQTT 5 PUBACK reason; paho: None

    def _delivered(self, item: Outbound, code: Any) -> None:
        """The broker has `item` (`code`: its MQTT 5 PUBACK reason, if any)."""
        self.publishing -= 1
        if isinstance(code, int) and code >= 0x80:
            self._bridge._count("publish_refused")
            self._bridge._log_limited(
                "publish_refused",
                "mqtt: the broker refused a reply to %r (MQTT 5 reason %#x, e.g. 0x87 not "
                "authorized: check its ACL for %r); not retried",
                item.topic,
                code,
                f"{self.settings.client_id}{OUTBOUND_CLIENT_SUFFIX}",
            )
        self._bridge._stats.messages_out += 1
        count_published()
        item.delivered()
        self._pump()

    def _check_timeouts(self) -> None:
        """Publishes without a PUBACK within `publish_timeout_s`: forget them on the client
        and publish them again (after `reconnect_min_s`), counted as retries."""
        self._timeouts = None
        client = self._client
        loop = self._loop
        if client is None or loop is None:
            return
        now = loop.time()
        expired: list[Outbound] = []
        for published, (item, mid, due) in list(self._in_flight.items()):
            if due > now:
                self._timeouts = loop.call_at(due, self._check_timeouts)
                break
            del self._in_flight[published]
            client.forget_publish(mid)  # (no PUBACK: the id is still this publish's)
            self.publishing -= 1
            expired.append(item)
        if expired:
            self._retry_later(
                expired,
                f"no PUBACK within publish_timeout={self.settings.publish_timeout_s:g}s "
                f"for {len(expired)} publishes",
            )

    def _retry_later(self, items: list[Outbound], why: str) -> None:
        self._bridge._count("publish_retries", len(items))
        self._bridge._log_limited(
            "publish_retry", "mqtt: %s (first to %r); will retry", why, items[0].topic
        )
        self._requeue(items)
        loop = self._loop
        if self._paused is None and loop is not None:
            self._paused = loop.call_later(self.settings.reconnect_min_s, self._resume)

    def _resume(self) -> None:
        self._paused = None
        self._pump()
