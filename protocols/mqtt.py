"""MQTT transport: a broker subscription bridged to per-device links, acked after commit.

`MqttBridge` keeps one connection to a broker (several URLs are tried in turn), subscribes to
each route's filter (`devices/{id}/telemetry` -> `devices/+/telemetry`) and turns every device
(route + id) into one `MqttLink` that the gateway's `LinkHandler` sees. Delivery guarantees:

* **Ack after commit.** Manual acks (either client, `settings.client`) are on from the first
  CONNECT, so no message (not even one queued by the broker while we were offline) is
  acknowledged before `handler.submit_message(...)`'s future resolved. A SIGKILL at any moment therefore loses
  nothing: the persistent session (3.1.1 clean_session=False, or 5 with a session expiry)
  makes the broker redeliver every unacked message. Delivery is at least once: a turn that
  committed just before a crash or a disconnect is delivered and applied again.
* **Acks follow commits, not arrival order.** Each message is acked as soon as its own turn
  committed, so a slow agent never holds back other devices' acks. (MQTT asks for PUBACKs in
  arrival order; brokers track in-flight messages by packet id and accept this.)
* **Failed turns are retried in-process, a bounded number of times**, with exponential
  backoff and full jitter between `retry_min_s` and `retry_max_s`, without acking: a broker
  redelivers only on reconnect, and reconnecting would redeliver (and re-apply) every other
  in-flight message too. After `max_attempts` failed turns (0 = retry forever) the message is
  a *poison message*: it is written to the dead-letter store (topic, payload, QoS, last error,
  attempts, first/last failure time; `protocols.dead_letters`) and acked only once that row
  is durable, so it never holds a pending slot forever and is never silently lost. Without a
  store it is acked and dropped with an error log. A store that cannot be written leaves the
  message unacked and retried. `LinkRejected` is final: the message is acked and counted in
  `rejected` (a redelivery would be refused again), except code 1001 (the handler is shutting
  down), which leaves it to the broker's redelivery. A retried message may be applied after
  later messages of the same device.
* **A full agent mailbox holds, never fails.** When the handler answers `Backpressure` (at
  once: nothing was enqueued), the message keeps its pending slot, is not acked and not
  counted as a failed attempt (`backpressure` counter); it and every later message of that
  device wait, in arrival order (`held` in stats), until `ready` resolves, then are submitted
  again. Other devices go on; once every pending slot is held, reading stops (below).
* **One device cannot monopolise its agent.** At most `max_inflight_per_device` messages of
  one device (route + id) are with the handler (in its agent's mailbox or its running batch)
  at a time; the device's later messages wait in the bridge, unacked and in arrival order
  (counted in `held`; they hold pending slots, so a long backlog ends in paused reading,
  below). The agent's other links (a TCP device, a dashboard) therefore wait behind at most
  that many of its turns, not behind the whole backlog.
* **Bounded device links.** Any publisher chooses the ids in its topics, and each new id costs
  a link, a runtime connection and an agent's SQLite file. A route may name the ids it serves
  (`allowed_ids`, `allowed_id_pattern`: other ids are acked and counted in `not_allowed`) and
  caps ids without an agent yet at `max_new_agents_per_minute` (token bucket; refusals are
  acked and counted in `new_agent_refused`, with one warning per refusal episode); ids the
  `known_agent` callback recognises are never capped (see `mqtt_admission`). A link with no
  inbound message for `link_idle_timeout_s` and none pending is closed through the handler's
  `close_link` (the runtime drops its connection; `links_evicted`); the device's next message
  opens a new link, after the old one's close has committed.
* **Backpressure, never drops.** At most `max_pending_messages` messages are between
  "pulled from the client" and "committed"; past that the bridge stops pulling. Messages the
  socket delivers meanwhile wait in the client's queue; when that queue reaches
  `max_pending_messages` too, the bridge stops *reading the socket* until it is half empty, so
  TCP flow control pushes back on the broker, for QoS 0 and QoS 1 alike (the broker's
  in-flight window, Mosquitto `max_inflight_messages` or our MQTT 5 Receive Maximum, usually
  stops QoS 1 earlier, but Mosquitto 2.0.11 was measured to exceed it once acks flow).
  Memory stays bounded by about 2 x `max_pending_messages` messages; what the broker does
  with its own backlog is its policy (Mosquitto: `max_queued_messages`, then drop). A pause
  longer than about `keepalive_s` ends in a keepalive timeout and a reconnect.
* **Not ours:** topics that match no route (e.g. a subscription left in the persistent session
  by an older config), empty ids, payloads over `max_payload_bytes`, and retained messages
  (replays of old state on subscribe, unless `accept_retained`) are logged, counted and
  acked, so they are neither processed nor redelivered forever.
* **Outbound: durable, never dropped by load.** Each link is a `DurableLink`: the gateway
  writes a reply to the agent's outbox (in the turn's transaction) and hands it over with
  `send_tracked`; the bridge publishes it at the route's QoS and reports it delivered on the
  PUBACK (QoS 1) or once the client wrote it (QoS 0). A publish interrupted by a
  disconnect is published again after the reconnect (at least once); after a gateway restart
  the gateway hands over the rows still undelivered. Replies are published from one FIFO
  backlog, at most `max_inflight_publishes` awaiting their PUBACK at a time (no task per
  reply: the PUBACK's callback publishes the next). When the backlog reaches
  `max_outbound_queue`, nothing is dropped: the bridge stops pulling device messages
  (backpressure, counted as
  `outbound_backpressure_pauses`) until it is below the limit again, so new turns stop
  producing replies; replies of turns already in flight are still queued (the backlog
  overshoots by at most their replies). A route with `on_overflow = "drop_oldest"` instead
  drops its own oldest queued reply (counted `outbound_dropped_by_policy`, logged, and
  reported delivered so that it is not resent). A reply that can never be published (over
  `max_payload_bytes`, a topic the client refuses) is logged as an error and counted. While
  Replies go out on a second broker connection of their own (client id `<client_id>-out`,
  clean session, no subscriptions): the device connection stops reading the socket for
  backpressure, and the PUBACKs of replies must not wait behind the device messages it holds
  back (one connection would deadlock the two directions).
  Untracked `link.send` (a handler without an outbox) goes through the same backlog.
* **Connection.** Reconnects forever with exponential backoff and full jitter; resubscribes
  and publishes a retained "online" to the status topic on every connect; the broker
  publishes the retained "offline" last will if we vanish, and `stop()` publishes it itself.

QoS 2 is refused in the settings (see `MqttSettings`).

Modules: this one is the bridge (inbound turns, acks, retries, links, the publish backlog);
`mqtt_link` the link and small types, `mqtt_outbound` the replies' connection,
`mqtt_publisher` the replies' backlog and its publishing,
`mqtt_metrics` the Prometheus metrics, `mqtt_settings` / `mqtt_admission` the configuration
and id admission, `mqtt_native` / `mqtt_client` the two client libraries behind
`BridgeClient`. None of them imports gatewayd.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from protocols import mqtt_client, mqtt_native
from protocols.link import (
    Backpressure,
    DeliveredCallback,
    LinkHandler,
    LinkRejected,
    Outcome,
    OutputAddress,
    TransportStats,
    attach_outputs,
    detach_outputs,
)
from protocols.mqtt_admission import RouteAdmission, Verdict
from protocols.mqtt_client import CLIENT_ERRORS, BridgeClient
from protocols.mqtt_link import (
    TRANSPORT,
    ConnectionState,
    DeadLetterSink,
    LinkKey,
    MqttLink,
)
from protocols.mqtt_link import Inbound as _Inbound
from protocols.mqtt_metrics import LIVE_BRIDGES as _LIVE_BRIDGES
from protocols.mqtt_metrics import count_event
from protocols.mqtt_outbound import (
    OUTBOUND_CLIENT_SUFFIX,
    describe,
    full_jitter,
)
from protocols.mqtt_outbound import Outbound as _Outbound
from protocols.mqtt_outbound import OutboundConnection as _OutboundConnection
from protocols.mqtt_publisher import ReplyPublisher
from protocols.mqtt_settings import (
    BrokerAddress,
    MqttConfigError,
    MqttRoute,
    MqttSettings,
    RouteMatch,
    RouteTable,
)
from protocols.mqttwire.aio import ConnectionLostError
from protocols.mqttwire.codec import Publish
from protocols.tasks import SpawnLoop, spawn_unsupervised

__all__ = ["MqttBridge", "MqttConfigError", "MqttLink", "MqttRoute", "MqttSettings"]

logger = logging.getLogger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
LOG_EVERY_S = 10.0  # rate limit for per-message warnings (unrouted, oversized, overflow)
IDLE_CLOSE_CODE = 1000
GOING_AWAY = 1001  # LinkRejected code of a handler that is shutting down: not final
# The idle sweep runs every half idle timeout, within these bounds.
MIN_SWEEP_INTERVAL_S = 0.05
MAX_SWEEP_INTERVAL_S = 30.0


class MqttBridge:
    """Bridges an MQTT broker to a `LinkHandler`; see the module docstring for guarantees.

    bridge = MqttBridge(settings, handler)
    await bridge.start()          # returns at once; connects and reconnects in the background
    await bridge.wait_connected(timeout_s=5)
    ...
    await bridge.stop(drain_timeout_s=10)
    """

    # Starts the long-lived loops (connection, replies' connection, idle eviction); the gateway
    # sets its supervisor's spawn (protocols/tasks.py).
    spawn_loop: SpawnLoop = staticmethod(spawn_unsupervised)

    def __init__(
        self,
        settings: MqttSettings,
        handler: LinkHandler,
        *,
        dead_letters: DeadLetterSink | None = None,
        known_agent: Callable[[str, str], bool] | None = None,
    ) -> None:
        """`dead_letters` stores messages given up after `max_attempts` failed turns (without
        one they are acked and dropped, with an error log). `known_agent(agent_class, id)` says
        whether an id already has an agent, so that the new-agent cap spares it; without it,
        every id without an open link counts as new."""
        self.settings = settings
        self._handler = handler
        self._routes = RouteTable(settings.routes)
        self._links: dict[tuple[int, str], MqttLink] = {}
        self._state = ConnectionState.IDLE
        self._client: BridgeClient | None = None
        self._connected_event = asyncio.Event()
        self._stopping = False
        self._accepting = True  # False once stop() began: no more pulls from the client
        self._pending: int = 0
        self._wakeup = asyncio.Event()  # set whenever a pending message finished (or stop)
        self._drained = asyncio.Event()
        self._drained.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._stats = TransportStats()
        self._counts: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._address_index = 0
        self._broker: BrokerAddress | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._peak_seen = 0
        self._dead_letters = dead_letters
        self._known_agent = known_agent
        now = time.monotonic()
        self._admission = [RouteAdmission(route, now) for route in settings.routes]
        self._next_seq = 0
        self._busy: dict[LinkKey, int] = {}  # messages pending per device
        self._last_active: dict[LinkKey, float] = {}  # least recently active first
        self._closing: dict[LinkKey, asyncio.Future[Outcome]] = {}  # close not yet committed
        self._waiting: dict[LinkKey, list[_Inbound]] = {}  # held messages, in arrival order
        self._submitted: dict[LinkKey, int] = {}  # handed to the handler, not yet settled
        self._window_room: dict[LinkKey, asyncio.Future[None]] = {}  # a full window's wait
        self._dead_letter_tasks: set[asyncio.Task[None]] = set()
        self._publisher = ReplyPublisher(self)  # the replies' backlog and its publishing
        self._outbound_connection = _OutboundConnection(self)
        _LIVE_BRIDGES.add(self)

    # ----------------------------------------------------------------- public surface

    @property
    def connected(self) -> bool:
        return self._state == ConnectionState.CONNECTED

    @property
    def state(self) -> str:
        """idle | connecting | connected | disconnected | stopped"""
        return self._state

    @property
    def broker(self) -> str | None:
        """The broker URL currently used (or last tried)."""
        return None if self._broker is None else str(self._broker)

    @property
    def stats(self) -> TransportStats:
        """A snapshot: TransportStats plus MQTT counters and connection state in `extra`."""
        extra = dict(self._counts)
        extra["connected"] = int(self.connected)
        extra["pending"] = self._pending
        extra["held"] = sum(len(items) for items in self._waiting.values())
        extra["outbound_queued"] = len(self._publisher.queue)
        extra["outbound_publishing"] = self._publisher.publishing
        client = self._client
        extra["incoming_queued"] = client.incoming.qsize() if client is not None else 0
        extra["incoming_queue_peak"] = self._incoming_peak(client)
        return TransportStats(
            links_open=len(self._links),
            messages_in=self._stats.messages_in,
            messages_out=self._stats.messages_out,
            rejected=self._stats.rejected,
            extra=extra,
        )

    @property
    def transport(self) -> str:
        return TRANSPORT

    def send_tracked(
        self, address: OutputAddress, seq: int, payload: bytes, on_delivered: DeliveredCallback
    ) -> None:
        """`protocols.link.DurableOutputs`: publish `payload` to `address.target` at
        `address.qos`; `on_delivered(seq)` after the PUBACK (QoS 1) or the socket write (0)."""
        item = _Outbound(
            address.target,
            address.qos,
            payload,
            self._publisher.reply_route(address.target),
            seq,
            on_delivered,
        )
        self._publisher.enqueue(item)

    async def start(self) -> None:
        """Start connecting (in the background; a broker that is down is retried forever)."""
        if self._tasks:
            raise RuntimeError("MqttBridge.start() called twice")
        if self._ssl_context is None and any(a.tls for a in self.settings.addresses):
            self._ssl_context = await asyncio.to_thread(self._make_ssl_context)
        self._tasks.append(self.spawn_loop("mqtt-connection", self._connection_loop))
        self._tasks.append(
            self.spawn_loop("mqtt-outbound-connection", self._outbound_connection.run)
        )
        if self.settings.link_idle_timeout_s > 0:
            self._tasks.append(self.spawn_loop("mqtt-idle", self._evict_idle_links))
        attach_outputs(self._handler, self)

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until connected and subscribed (raises TimeoutError)."""
        await asyncio.wait_for(self._connected_event.wait(), timeout_s)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop pulling messages, wait (bounded) for pending turns to commit and be acked,
        close every link, flush replies, publish "offline" and disconnect. Whatever is not
        acked by then is redelivered by the broker on the next start."""
        if self._state == ConnectionState.STOPPED:
            return
        deadline = time.monotonic() + drain_timeout_s
        self._accepting = False
        self._wakeup.set()
        for task in list(self._retry_tasks):  # failed turns are left to the broker's redelivery
            task.cancel()
        for key in list(self._waiting):  # so are held messages
            self._release_waiting(key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), _left(deadline))
        closes = [
            self._close_link(link, 1001, "gateway shutting down") for link in self._links.values()
        ]
        self._links.clear()
        if closes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*closes, return_exceptions=True), _left(deadline)
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._publisher.idle.wait(), _left(deadline))
        detach_outputs(self._handler, self)
        client = self._client
        if client is not None and self.connected and self.settings.status_topic:
            with contextlib.suppress(*CLIENT_ERRORS, TimeoutError):
                await client.publish(
                    self.settings.resolved_status_topic,
                    STATUS_OFFLINE,
                    qos=1,
                    retain=True,
                    timeout=max(0.1, min(2.0, _left(deadline))),
                )
        self._stopping = True
        self._outbound_connection.close()
        # Let it leave on its own (a cancel while it connects leaves aiomqtt in a bad state).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._outbound_connection.finished.wait(), max(1.0, _left(deadline))
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._publisher.close()
        self._set_state(ConnectionState.STOPPED)
        logger.info(
            "mqtt: bridge stopped (%d messages left unacked for redelivery, %d replies left "
            "unpublished: tracked ones are sent again on the next start)",
            self._pending,
            len(self._publisher.queue) + self._publisher.publishing,
        )

    # ----------------------------------------------------------------- connection

    def _make_ssl_context(self) -> ssl.SSLContext:
        return make_ssl_context(self.settings)

    def _make_outbound_client(self, address: BrokerAddress) -> BridgeClient:
        """The replies' connection: clean session, no will, no subscriptions."""
        s = self.settings
        if s.client == "native":
            return mqtt_native.outbound_client(
                s, address, self._ssl_context, f"{s.client_id}{OUTBOUND_CLIENT_SUFFIX}"
            )
        return mqtt_client.outbound_client(
            s, address, self._ssl_context, f"{s.client_id}{OUTBOUND_CLIENT_SUFFIX}"
        )

    def _make_client(self, address: BrokerAddress) -> BridgeClient:
        s = self.settings
        will = (s.resolved_status_topic, STATUS_OFFLINE) if s.status_topic else None
        on_pause = functools.partial(self._count, "read_pauses")
        if s.client == "native":
            return mqtt_native.device_client(
                s, address, self._ssl_context, will=will, on_pause=on_pause
            )
        return mqtt_client.device_client(
            s,
            address,
            self._ssl_context,
            will=will,
            on_pause=on_pause,
            subscriptions=len(self._routes.filters),
        )

    async def _connection_loop(self) -> None:
        attempt = 0
        addresses = self.settings.addresses
        while not self._stopping:
            address = addresses[self._address_index % len(addresses)]
            self._broker = address
            self._set_state(ConnectionState.CONNECTING)
            client = self._make_client(address)
            connected_at: float | None = None
            reason = ""
            try:
                async with client:
                    connected_at = time.monotonic()
                    self._client = client
                    # Read while subscribing: the broker sends the session's backlog right
                    # after CONNACK, ahead of our SUBACKs, and flow control may pause reading.
                    reader = asyncio.create_task(self._read_loop(client))
                    try:
                        await self._on_connected(client, address, reader)
                        await reader
                    finally:
                        reader.cancel()
                        await asyncio.gather(reader, return_exceptions=True)
            except CLIENT_ERRORS as exc:
                reason = describe(exc)
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug here must not end reconnecting for good
                logger.exception("mqtt: unexpected error on the connection to %s", address)
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._client = None
                self._release_held_from(client)
                self._peak_seen = max(self._peak_seen, client.incoming.peak)
                self._connected_event.clear()
                if not self._stopping:
                    self._set_state(ConnectionState.DISCONNECTED)
            if self._stopping:
                return
            if connected_at is not None and time.monotonic() - connected_at >= (
                self.settings.reconnect_max_s
            ):
                attempt = 0  # a connection that lived long resets the backoff
            if connected_at is None:
                self._address_index += 1  # try the next broker URL
            delay = full_jitter(
                attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s
            )
            attempt += 1
            self._count("disconnects" if connected_at is not None else "connect_failures")
            logger.warning(
                "mqtt: %s %s (%s); retrying in %.1fs",
                "lost connection to" if connected_at is not None else "cannot connect to",
                address,
                reason or "closed",
                delay,
            )
            await asyncio.sleep(delay)

    async def _on_connected(
        self, client: BridgeClient, address: BrokerAddress, reader: asyncio.Task[None]
    ) -> None:
        s = self.settings
        # Answers may queue behind a paused backlog: allow for the keepalive to notice a dead
        # broker rather than the short connect timeout.
        timeout_s = max(s.connect_timeout_s, 2.0 * s.keepalive_s)
        for topic_filter in self._routes.filters:
            subscribing = asyncio.ensure_future(
                client.subscribe(topic_filter, qos=s.qos, timeout=timeout_s)
            )
            await asyncio.wait({subscribing, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not subscribing.done():  # the reader ended first: the connection is gone
                subscribing.cancel()
                await asyncio.gather(subscribing, return_exceptions=True)
                await reader  # raises its MqttError
                raise ConnectionLostError("connection closed while subscribing")
            result = subscribing.result()
            code = result[0]
            value = code.value if hasattr(code, "value") else code
            if value >= 0x80:
                raise ConnectionLostError(
                    f"broker refused the subscription to {topic_filter!r} (code {value:#x}); "
                    "check the broker's ACL for this user"
                )
        if s.status_topic:
            await client.publish(
                s.resolved_status_topic, STATUS_ONLINE, qos=1, retain=True, timeout=timeout_s
            )
        self._set_state(ConnectionState.CONNECTED)
        self._connected_event.set()
        self._count("connects")
        logger.info(
            "mqtt: connected to %s as %r, subscribed to %s",
            address,
            s.client_id,
            ", ".join(self._routes.filters),
        )

    def _set_state(self, state: str) -> None:
        self._state = state

    # ----------------------------------------------------------------- inbound

    async def _read_loop(self, client: BridgeClient) -> None:
        low_water = client.incoming.high_water // 2
        while True:
            if not self._has_capacity():  # (no coroutine per message while there is room)
                await self._wait_for_capacity(client)
            message = await client.receive()  # raises a CLIENT_ERRORS once disconnected
            if client.reading_paused and client.incoming.qsize() <= low_water:
                client.resume_reading()
            self._on_message(client, message)

    def _has_capacity(self) -> bool:
        return (
            self._accepting
            and self._pending < self.settings.max_pending_messages
            and self._publisher.blocking_queued < self.settings.max_outbound_queue
        )

    async def _wait_for_capacity(self, client: BridgeClient) -> None:
        """Backpressure: block while too many messages await their commit, while too many
        replies await publishing, or while stopping. A disconnect ends the wait too, so a
        stuck turn never delays reconnecting."""
        if self._has_capacity():
            return
        disconnected = client.disconnected
        outbound_full = self._publisher.blocking_queued >= self.settings.max_outbound_queue
        self._count("outbound_backpressure_pauses" if outbound_full else "backpressure_pauses")

        async def until_capacity() -> None:
            nonlocal outbound_full
            while not self._has_capacity():
                if (
                    not outbound_full
                    and self._publisher.blocking_queued >= self.settings.max_outbound_queue
                ):
                    # A pause that began for pending turns goes on for the replies' backlog.
                    outbound_full = True
                    self._count("outbound_backpressure_pauses")
                self._wakeup.clear()
                await self._wakeup.wait()

        waiter = asyncio.ensure_future(until_capacity())
        try:
            await asyncio.wait({waiter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if disconnected.done():
            cause = None if disconnected.cancelled() else disconnected.exception()
            raise ConnectionLostError(
                "disconnected while waiting for pending turns to commit"
            ) from cause

    def _on_message(self, client: BridgeClient, message: Publish) -> None:
        topic = message.topic
        payload = message.payload
        qos = message.qos
        if len(payload) > self.settings.max_payload_bytes:
            self._skip(
                client,
                message,
                "oversized",
                "mqtt: dropped a %d-byte message on %r (max_payload_bytes=%d)",
                len(payload),
                topic,
                self.settings.max_payload_bytes,
            )
            return
        if message.retain and not self.settings.accept_retained:
            self._skip(
                client,
                message,
                "retained_skipped",
                "mqtt: skipped retained message on %r (stale state replayed on subscribe; "
                "set accept_retained to process it)",
                topic,
            )
            return
        match = self._routes.match(topic)
        if match is None:
            self._skip(
                client,
                message,
                "unrouted",
                "mqtt: message on %r matches no route; acked and ignored (a subscription left "
                "in the persistent session by an older config?)",
                topic,
            )
            return
        key = (match.route_index, match.device_id)
        # Admission is for ids with neither an open link nor a message already in flight
        # (e.g. held while its link waits to open): those were admitted already.
        admitted = key in self._links or key in self._busy
        if not admitted and not self._admit(client, message, match):
            return
        item = _Inbound(client, message.packet_id, qos, topic, match, payload, self._next_seq)
        self._next_seq += 1
        self._pending += 1
        self._busy[key] = self._busy.get(key, 0) + 1
        self._touch(key)
        self._drained.clear()
        self._submit(item)

    def _skip(self, client: BridgeClient, message: Publish, outcome: str, *log: Any):
        self._count(outcome)
        self._log_limited(outcome, *log)
        self._ack(client, message.packet_id, message.qos)

    # ----------------------------------------------------------------- admission of new ids

    def _admit(self, client: BridgeClient, message: Publish, match: RouteMatch) -> bool:
        """An id without an open link: is it allowed, and may it become a new agent now?
        Refused messages are acked (a redelivery would be refused again) and counted."""
        key = (match.route_index, match.device_id)
        admission = self._admission[match.route_index]
        decision = admission.check(
            match.device_id,
            is_known=lambda: key in self._closing or self._is_known_agent(match),
            now=time.monotonic(),
        )
        route = match.route
        if decision.verdict is Verdict.ADMIT:
            if decision.episode_ended is not None:
                episode = decision.episode_ended
                logger.info(
                    "mqtt: route %r admits new device ids again; %d messages from new ids were "
                    "acked and dropped over the last %.0fs (max_new_agents_per_minute=%d)",
                    route.topic,
                    episode.refused,
                    time.monotonic() - episode.started_at,
                    route.max_new_agents_per_minute,
                )
            return True
        if decision.verdict is Verdict.NOT_ALLOWED:
            self._skip(
                client,
                message,
                Verdict.NOT_ALLOWED.value,
                "mqtt: device id %r on %r is not in the allow-list of route %r; acked and "
                "ignored (add it to allowed_ids_file or allowed_id_pattern if it is yours)",
                match.device_id,
                message.topic,
                route.topic,
            )
            return False
        self._count(Verdict.RATE_LIMITED.value)
        self._ack(client, message.packet_id, message.qos)
        if decision.episode_started is not None:
            logger.warning(
                "mqtt: route %r reached max_new_agents_per_minute=%d: messages from device ids "
                "without an agent (first: %r) are acked and dropped until the rate falls; "
                "known devices are unaffected. If these devices are yours, raise the cap; if "
                "not, set an allow-list (allowed_ids_file, allowed_id_pattern) for the route",
                route.topic,
                route.max_new_agents_per_minute,
                match.device_id,
            )
        return False

    def _is_known_agent(self, match: RouteMatch) -> bool:
        if self._known_agent is None:
            return False
        try:
            return self._known_agent(match.route.agent_class, match.device_id)
        except Exception:  # e.g. an id the runtime cannot map to a file: treat it as new
            return False

    # ----------------------------------------------------------------- submission

    def _link_for(self, match: RouteMatch, topic: str) -> MqttLink:
        """The device's open link, opened now if needed. Raises `Backpressure` (and forgets
        the link) when the handler cannot take the open event yet."""
        key = (match.route_index, match.device_id)
        link = self._links.get(key)
        if link is None:
            reply_topic = self._routes.reply_topic(match.route_index, match.device_id)
            link = MqttLink(self, match, topic, reply_topic)
            self._links[key] = link
            context = {
                "transport": TRANSPORT,
                "topic": topic,
                "device_id": match.device_id,
                "reply_topic": reply_topic,
                "route_topic": match.route.topic,
                "broker": self.broker,
            }
            try:
                opened = self._handler.open_link(link, context)
            except Exception as exc:  # a handler bug must not kill the bridge
                opened = _failed_future(exc)
            refused = _backpressure_of(opened)
            if refused is not None:
                del self._links[key]
                raise refused
            opened.add_done_callback(functools.partial(self._on_opened, link))
        return link

    def _on_opened(self, link: MqttLink, future: asyncio.Future[Outcome]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            return
        # Forget the link so that the device's next message tries to open it again.
        if self._links.get(link.key) is link:
            del self._links[link.key]
        if isinstance(exc, LinkRejected):
            self._log_limited(
                "open_rejected",
                "mqtt: %s refused %s: %s",
                link.route.agent_class,
                link.remote,
                exc.reason,
            )
        else:
            self._log_limited("open_failed", "mqtt: opening %s failed: %r", link.remote, exc)

    def _submit(self, item: _Inbound) -> None:
        """Submit now, or queue behind the device's held messages, or wait for the device's
        previous link to finish closing (the handler refuses a link id that is still open)."""
        key = item.key
        if key in self._waiting:
            bisect.insort(self._waiting[key], item, key=_arrival)
            return
        closing = self._closing.get(key)
        if closing is not None and not closing.done():
            self._wait(item, closing)
            return
        if self._submitted.get(key, 0) >= self.settings.max_inflight_per_device:
            self._wait(item, self._room_in_window(key))
            return
        try:
            link = self._link_for(item.match, item.topic)
            future = self._handler.submit_message(link, item.payload, None)
        except Exception as exc:  # a handler bug is a failed turn, not a dead bridge
            future = _failed_future(exc)
        refused = _backpressure_of(future)
        if refused is not None:
            self._hold(item, refused)
            return
        self._submitted[key] = self._submitted.get(key, 0) + 1
        future.add_done_callback(functools.partial(self._on_committed, item))

    def _room_in_window(self, key: LinkKey) -> asyncio.Future[None]:
        """Resolves once fewer than `max_inflight_per_device` of the device's messages are
        with the handler: the device's later messages wait here, unacked, in arrival order."""
        room = self._window_room.get(key)
        if room is None:
            room = self._window_room[key] = asyncio.get_running_loop().create_future()
            self._count("device_window_full")
        return room

    def _settled(self, key: LinkKey) -> None:
        """One of the device's submitted messages has its outcome: a place in its window."""
        left = self._submitted.get(key, 1) - 1
        if left > 0:
            self._submitted[key] = left
        else:
            self._submitted.pop(key, None)
        if left < self.settings.max_inflight_per_device:
            room = self._window_room.pop(key, None)
            if room is not None and not room.done():
                room.set_result(None)

    def _hold(self, item: _Inbound, refusal: Backpressure) -> None:
        """The agent's mailbox is full: keep the message (unacked, in its pending slot) and
        submit it again when the handler says there is room. Not a failed attempt."""
        self._count("backpressure")
        self._log_limited(
            "backpressure",
            "mqtt: agent %s:%s cannot take more messages now (%s); holding the message on %r "
            "unacked until it has room",
            item.match.route.agent_class,
            item.match.device_id,
            refusal.reason,
            item.topic,
        )
        self._wait(item, refusal.ready)

    def _wait(self, item: _Inbound, until: asyncio.Future[Any]) -> None:
        waiting = self._waiting.get(item.key)
        if waiting is not None:
            bisect.insort(waiting, item, key=_arrival)
            return
        self._waiting[item.key] = [item]
        until.add_done_callback(functools.partial(self._resume, item.key))

    def _resume(self, key: LinkKey, _: asyncio.Future[Any]) -> None:
        """Submit a device's held messages in arrival order, until one is held again."""
        waiting = self._waiting.pop(key, None)
        if not waiting:
            return
        for index, item in enumerate(waiting):
            if not self._accepting or item.client is not self._client:
                # Shutting down, or its connection is gone: the broker redelivers it.
                self._count("failed_left_for_redelivery")
                self._release(item)
                continue
            self._submit(item)
            if key in self._waiting:  # held again: the rest wait behind it
                self._waiting[key].extend(waiting[index + 1 :])
                return

    def _release_held_from(self, client: BridgeClient) -> None:
        """The connection is gone: its held messages give back their pending slots (the
        broker redelivers them on the next connection), so they cannot slow its reading."""
        for key, items in list(self._waiting.items()):
            stale = [item for item in items if item.client is client]
            if not stale:
                continue
            kept = [item for item in items if item.client is not client]
            if kept:
                self._waiting[key] = kept
            else:
                del self._waiting[key]
            for item in stale:
                self._count("failed_left_for_redelivery")
                self._release(item)

    def _release_waiting(self, key: LinkKey) -> None:
        for item in self._waiting.pop(key, ()):
            self._count("failed_left_for_redelivery")
            self._release(item)

    def _on_committed(self, item: _Inbound, future: asyncio.Future[Outcome]) -> None:
        self._settled(item.key)
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is None:
            self._stats.messages_in += 1
            outcome = "duplicate" if future.result() is Outcome.DUPLICATE else "applied"
            self._count(outcome)
            self._finish(item)
        elif isinstance(exc, Backpressure):
            self._hold(item, exc)
        elif isinstance(exc, LinkRejected) and exc.code != GOING_AWAY:
            self._stats.rejected += 1
            self._count("rejected")
            self._log_limited(
                "rejected",
                "mqtt: %s refused a message on %r: %s; acked and dropped",
                item.match.route.agent_class,
                item.topic,
                exc.reason,
            )
            self._finish(item)
        elif (
            self._stopping
            or not self._accepting
            or item.client is not self._client
            or isinstance(exc, LinkRejected)
        ):
            # Shutting down, or the connection it came on is gone: the broker redelivers it.
            self._count("failed_left_for_redelivery")
            self._release(item)
        else:
            self._on_failed_turn(item, exc)

    def _on_failed_turn(self, item: _Inbound, exc: BaseException) -> None:
        now = time.time()
        item.attempts += 1
        item.first_failed_at = item.first_failed_at or now
        item.last_error = repr(exc)
        max_attempts = self.settings.max_attempts
        if max_attempts and item.attempts >= max_attempts:
            self._give_up(item, now)
            return
        self._count("retries")
        delay = full_jitter(item.attempts - 1, self.settings.retry_min_s, self.settings.retry_max_s)
        self._log_limited(
            "retry",
            "mqtt: turn for %r (device %r) failed (attempt %d of %s: %s); not acked, "
            "retrying in %.1fs",
            item.topic,
            item.match.device_id,
            item.attempts,
            max_attempts or "unlimited",
            item.last_error,
            delay,
        )
        self._retry_in(item, delay)

    def _retry_in(self, item: _Inbound, delay_s: float) -> None:
        task = asyncio.get_running_loop().create_task(self._retry_later(item, delay_s))
        self._retry_tasks.add(task)
        task.add_done_callback(self._retry_tasks.discard)

    async def _retry_later(self, item: _Inbound, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        except asyncio.CancelledError:
            self._release(item)
            raise
        if item.client is not self._client or not self._accepting:
            self._count("failed_left_for_redelivery")
            self._release(item)
            return
        self._submit(item)

    # ----------------------------------------------------------------- poison messages

    def _give_up(self, item: _Inbound, now: float) -> None:
        """`max_attempts` failed turns: store the message as a dead letter, then ack it."""
        store = self._dead_letters
        if store is None:
            self._count("dead_letters_dropped")
            logger.error(
                "mqtt: gave up on a message on %r (device %r, agent class %s) after %d "
                "attempts, last error: %s; acked and DROPPED (no dead-letter store configured)",
                item.topic,
                item.match.device_id,
                item.match.route.agent_class,
                item.attempts,
                item.last_error,
            )
            self._finish(item)
            return
        task = asyncio.get_running_loop().create_task(self._dead_letter(store, item, now))
        self._dead_letter_tasks.add(task)
        task.add_done_callback(self._dead_letter_tasks.discard)

    async def _dead_letter(self, store: DeadLetterSink, item: _Inbound, now: float) -> None:
        try:
            row_id = await asyncio.to_thread(
                functools.partial(
                    store.add,
                    topic=item.topic,
                    payload=item.payload,
                    qos=item.qos,
                    error=item.last_error,
                    attempts=item.attempts,
                    first_failed_at=item.first_failed_at,
                    last_failed_at=now,
                )
            )
        except Exception as exc:
            # Not stored, so not acked: keep retrying the message; a later attempt stores it.
            self._count("dead_letter_errors")
            delay = self.settings.retry_max_s
            self._log_limited(
                "dead_letter_error",
                "mqtt: cannot write the dead letter for a message on %r (device %r) to %s: "
                "%r; not acked, retrying the message in %.0fs (check the state dir's disk)",
                item.topic,
                item.match.device_id,
                store.path,
                exc,
                delay,
            )
            self._retry_in(item, delay)
            return
        self._count("dead_lettered")
        self._log_limited(
            "dead_lettered",
            "mqtt: gave up on a message on %r (device %r, agent class %s) after %d attempts, "
            "last error: %s; acked and stored as dead letter #%d in %s (inspect: gatewayd "
            "dead-letters list -c CONFIG; replay: gatewayd dead-letters replay -c CONFIG %d)",
            item.topic,
            item.match.device_id,
            item.match.route.agent_class,
            item.attempts,
            item.last_error,
            row_id,
            store.path,
            row_id,
        )
        self._finish(item)

    # ----------------------------------------------------------------- completion

    def _finish(self, item: _Inbound) -> None:
        if item.qos == 0:
            pass
        elif self._ack(item.client, item.mid, item.qos):
            self._count("acked")
        else:
            # Committed, but the connection it came on is gone: the broker redelivers it.
            self._count("ack_lost")
        self._release(item)

    def _release(self, item: _Inbound) -> None:
        self._pending -= 1
        key = item.key
        busy = self._busy.get(key, 1) - 1
        if busy > 0:
            self._busy[key] = busy
        else:
            self._busy.pop(key, None)
        self._touch(key)
        if self._pending == 0:
            self._drained.set()
        self._wakeup.set()

    def _ack(self, client: BridgeClient, mid: int, qos: int) -> bool:
        """PUBACK on the connection the message came on; packet ids are per connection."""
        if qos == 0:
            return True
        if client is not self._client:
            return False
        return client.ack(mid, qos)

    # ----------------------------------------------------------------- idle links

    def _touch(self, key: LinkKey) -> None:
        if self.settings.link_idle_timeout_s > 0:
            self._last_active.pop(key, None)  # re-insert: the dict stays oldest-first
            self._last_active[key] = time.monotonic()

    async def _evict_idle_links(self) -> None:
        idle_s = self.settings.link_idle_timeout_s
        interval_s = min(MAX_SWEEP_INTERVAL_S, max(MIN_SWEEP_INTERVAL_S, idle_s / 2))
        while True:
            await asyncio.sleep(interval_s)
            try:
                self._close_idle_links(time.monotonic() - idle_s)
            except Exception:  # a bug here must not leave links growing for good
                logger.exception(
                    "mqtt: closing idle links failed; trying again in %.1fs", interval_s
                )

    def _close_idle_links(self, cutoff: float) -> None:
        """Close the links of devices with no message since `cutoff` and none pending: the
        handler drops their connections; a device's next message opens its link again."""
        if not self._accepting:
            return
        closed = 0
        idle_s = self.settings.link_idle_timeout_s
        while self._last_active:
            key, last_active = next(iter(self._last_active.items()))
            if last_active > cutoff:
                break
            del self._last_active[key]
            link = self._links.get(key)
            if link is None or self._busy.get(key):  # a busy one is touched again when done
                continue
            self._forget_link(link, IDLE_CLOSE_CODE, f"no message for {idle_s:g}s")
            closed += 1
        if closed:
            self._count("links_evicted", closed)
            logger.info(
                "mqtt: closed %d idle device links (no message for %gs, mqtt.link_idle_timeout); "
                "%d stay open; a device's next message opens its link again",
                closed,
                idle_s,
                len(self._links),
            )

    # ----------------------------------------------------------------- links & outbound

    def _close_link(self, link: MqttLink, code: int, reason: str) -> asyncio.Future[Outcome]:
        link._closed = True
        try:
            return self._handler.close_link(link, code, reason)
        except Exception as exc:
            return _failed_future(exc)

    def _forget_link(self, link: MqttLink, code: int, reason: str) -> None:
        """Close `link`; the device's next message waits until the close has committed, then
        opens a new link (the handler holds the old link id until its on_close ran)."""
        if self._links.get(link.key) is link:
            del self._links[link.key]
        future = self._close_link(link, code, reason)
        self._closing[link.key] = future
        future.add_done_callback(functools.partial(self._on_link_closed, link.key))

    def _on_link_closed(self, key: LinkKey, future: asyncio.Future[Outcome]) -> None:
        if self._closing.get(key) is future:
            del self._closing[key]
        _consume_exception(future)

    def _link_closed_by_gateway(self, link: MqttLink, code: int, reason: str) -> None:
        self._forget_link(link, code, reason)

    # ----------------------------------------------------------------- helpers

    def _incoming_peak(self, client: BridgeClient | None) -> int:
        if client is not None:
            self._peak_seen = max(self._peak_seen, client.incoming.peak)
        return self._peak_seen

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n
        count_event(name, n)

    def _log_limited(self, key: str, msg: str, *args: Any) -> None:
        """Warn at most once per LOG_EVERY_S per kind, saying how many were suppressed."""
        now = time.monotonic()
        last = self._last_log.get(key)
        suppressed_key = f"_suppressed_{key}"
        if last is not None and now - last < LOG_EVERY_S:
            self._last_log[suppressed_key] = self._last_log.get(suppressed_key, 0) + 1
            return
        suppressed = int(self._last_log.pop(suppressed_key, 0))
        self._last_log[key] = now
        if suppressed:
            msg += f" (+{suppressed} similar in the last {LOG_EVERY_S:.0f}s)"
        logger.warning(msg, *args)


def make_ssl_context(settings: MqttSettings) -> ssl.SSLContext:
    """The client TLS context for `mqtts://` brokers (blocking: reads the files)."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _failed_future(exc: BaseException) -> asyncio.Future[Outcome]:
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _backpressure_of(future: asyncio.Future[Any]) -> Backpressure | None:
    """The `Backpressure` a handler answered with at once (nothing enqueued), if any."""
    if future.done() and not future.cancelled():
        exc = future.exception()
        if isinstance(exc, Backpressure):
            return exc
    return None


def _arrival(item: _Inbound) -> int:
    return item.seq


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("mqtt: on_close failed: %r", future.exception())
