"""The MQTT bridge's reply backlog: one FIFO of replies (`Outbound`) and the
`max_inflight_publishes` workers that publish them on the replies' connection, with each
route's overflow policy. Never imports gatewayd."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from protocols.mqtt_client import CLIENT_ERRORS, BridgeClient
from protocols.mqtt_metrics import MQTT_PUBLISHED
from protocols.mqtt_outbound import OUTBOUND_CLIENT_SUFFIX, Outbound
from protocols.mqttwire.aio import ConnectionLostError, MqttError

if TYPE_CHECKING:
    from protocols.mqtt import MqttBridge

__all__ = ["ReplyPublisher"]

logger = logging.getLogger("protocols.mqtt")  # the bridge's logger: one name for operators


class ReplyPublisher:
    """Replies wait in `queue` (FIFO) until one of the workers (`worker()`, spawned by the
    bridge) publishes them. Nothing is dropped for load: the bridge stops reading device
    messages while `blocking_queued` reaches `max_outbound_queue`; a route with
    `on_overflow = "drop_oldest"` drops its own oldest reply instead."""

    def __init__(self, bridge: MqttBridge) -> None:
        self._bridge = bridge
        self.settings = bridge.settings
        self.queue: deque[Outbound] = deque()
        # Workers waiting for an item: one is woken per item queued (an Event shared by all
        # `max_inflight_publishes` workers woke every one of them for every reply).
        self.idle_workers: deque[asyncio.Future[None]] = deque()
        self.publishing = 0  # publishes handed to the client, not yet acknowledged
        self.idle = asyncio.Event()  # set while nothing is queued or publishing
        self.idle.set()
        self._queued_by_route: dict[int | None, int] = {}
        self.blocking_queued = 0  # queued replies of routes that push back (not drop_oldest)

    def reply_route(self, topic: str) -> int | None:
        """The route whose reply topic `topic` is (for its overflow policy), None if none."""
        for index, route in enumerate(self.settings.routes):
            head, _, tail = route.reply_topic.partition("{id}")
            if topic.startswith(head) and topic.endswith(tail) and len(topic) > len(head + tail):
                return index
        return None

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
        drops = self._drops_oldest(item.route_index)
        if drops and self._queued_by_route.get(item.route_index, 0) >= (
            self.settings.max_outbound_queue
        ):
            self._drop_oldest_of(item.route_index)
        self.queue.append(item)
        self._queued_by_route[item.route_index] = self._queued_by_route.get(item.route_index, 0) + 1
        if not drops:
            self.blocking_queued += 1
        self.idle.clear()
        self._wake_one_worker()

    def _wake_one_worker(self) -> None:
        while self.idle_workers:
            waiter = self.idle_workers.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _drops_oldest(self, route_index: int | None) -> bool:
        return (
            route_index is not None
            and self.settings.routes[route_index].on_overflow == "drop_oldest"
        )

    def _dequeued(self, item: Outbound) -> None:
        self._queued_by_route[item.route_index] -= 1
        if not self._drops_oldest(item.route_index):
            self.blocking_queued -= 1

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

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                waiter: asyncio.Future[None] = loop.create_future()
                self.idle_workers.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        self._wake_one_worker()  # it was woken for an item: pass it on
                    raise
            item = self.queue.popleft()
            self._dequeued(item)
            self.publishing += 1
            try:
                await self._publish(item)
            finally:
                self.publishing -= 1
                if not self.queue and self.publishing == 0:
                    self.idle.set()
                self._bridge._wakeup.set()  # the read loop may be waiting for outbound room

    async def _publish(self, item: Outbound) -> None:
        outbound = self._bridge._outbound_connection
        while True:
            await outbound.connected.wait()
            client = outbound.client
            if client is None:
                continue
            try:
                await self._publish_until_lost(client, item)
            except CLIENT_ERRORS as exc:
                # Lost the connection mid-publish: publish again after the reconnect.
                self._bridge._count("publish_retries")
                self._bridge._log_limited(
                    "publish_retry",
                    "mqtt: publish to %r failed (%s); will retry",
                    item.topic,
                    exc,
                )
                if client is outbound.client:
                    await asyncio.sleep(self.settings.reconnect_min_s)
                continue
            except Exception as exc:  # e.g. a topic the client refuses: it can never be sent
                self._bridge._count("publish_errors")
                logger.error(
                    "mqtt: cannot publish to %r (%r); reply dropped (check the route's "
                    "reply_topic and the agent id)",
                    item.topic,
                    exc,
                )
                item.delivered()
                return
            self._bridge._stats.messages_out += 1
            MQTT_PUBLISHED.inc()
            item.delivered()
            return

    async def _publish_until_lost(self, client: BridgeClient, item: Outbound) -> None:
        """Publish on `client`, but give up as soon as its connection is lost: aiomqtt leaves a
        QoS 1 publish waiting for its PUBACK until `publish_timeout_s` even after the
        connection died, and the reply should go out on the next connection at once."""
        lost = client.disconnected
        if lost.done():
            raise ConnectionLostError("the replies' connection was lost")
        mid, published = client.publish_nowait(item.topic, item.payload, item.qos)
        if not published.done():
            await asyncio.wait(
                {published, lost},
                timeout=self.settings.publish_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        if published.done():
            code = published.result()  # MQTT 5 PUBACK reason (native client); paho: None
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
            return
        client.forget_publish(mid)
        if lost.done():
            raise ConnectionLostError("the replies' connection was lost before the broker's PUBACK")
        raise MqttError(f"no PUBACK within publish_timeout={self.settings.publish_timeout_s:g}s")
