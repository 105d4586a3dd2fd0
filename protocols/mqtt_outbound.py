"""The MQTT bridge's outbound side: one reply waiting to be published (`Outbound`) and the
replies' own broker connection (`OutboundConnection`, client id `<client_id>-out`). Never
imports gatewayd."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocols.link import DeliveredCallback
from protocols.mqtt_client import CLIENT_ERRORS, BridgeClient

if TYPE_CHECKING:
    from protocols.mqtt import MqttBridge

__all__ = ["OUTBOUND_CLIENT_SUFFIX", "Outbound", "OutboundConnection", "describe", "full_jitter"]

logger = logging.getLogger("protocols.mqtt")  # the bridge's logger: one name for operators

OUTBOUND_CLIENT_SUFFIX = "-out"  # client id of the replies' connection: `<client_id>-out`


@dataclass(slots=True, eq=False)  # by identity: the publisher keys its in-flight ones by it
class Outbound:
    """One reply waiting to be published (and, if tracked, reported delivered)."""

    topic: str
    qos: int
    payload: bytes
    route_index: int | None  # None: no route's reply topic matches (its policy: backpressure)
    seq: int = 0
    on_delivered: DeliveredCallback | None = None

    def delivered(self) -> None:
        if self.on_delivered is not None:
            callback, self.on_delivered = self.on_delivered, None
            callback(self.seq)


class OutboundConnection:
    """The bridge's second broker connection, for replies only (see the module docstring).
    It follows the device connection: it connects to the broker that one is connected to,
    and reconnects with the same backoff when it is lost. `close()` ends it, and `run()` then
    ends as cancelled (a supervisor must not restart it); cancelling alone is not enough:
    aiomqtt's connect swallows a cancellation that arrives while it connects."""

    def __init__(self, bridge: MqttBridge) -> None:
        self._bridge = bridge
        self.client: BridgeClient | None = None
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()
        self.finished = asyncio.Event()  # set while `run()` is not running
        self.finished.set()

    def close(self) -> None:
        self._closing.set()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.finished.set()
        raise asyncio.CancelledError  # closed: ended for good

    async def _until_closing(self, awaitable: Any) -> bool:
        """Wait for `awaitable` or `close()`; True when closing. Raises what it raises."""
        waiter = asyncio.ensure_future(awaitable)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if self._closing.is_set():
            waiter.cancel()
            return True
        waiter.result()
        return False

    async def _run(self) -> None:
        self.finished.clear()
        bridge = self._bridge
        attempt = 0
        while not self._closing.is_set():
            if await self._until_closing(bridge._connected_event.wait()):
                return
            address = bridge._broker
            assert address is not None
            client = bridge._make_outbound_client(address)
            reason = ""
            try:
                async with client:
                    self.client = client
                    self.connected.set()
                    bridge._publisher.connected(client)
                    attempt = 0
                    # Shielded: ending the wait must not cancel aiomqtt's own future (whose
                    # error, if it comes after we stopped waiting, nobody needs).
                    disconnected = client.disconnected
                    disconnected.add_done_callback(retrieve)
                    if await self._until_closing(asyncio.shield(disconnected)):
                        return
            except CLIENT_ERRORS as exc:
                reason = describe(exc)
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self.client = None
                self.connected.clear()
            if self._closing.is_set():
                return
            delay = full_jitter(
                attempt, bridge.settings.reconnect_min_s, bridge.settings.reconnect_max_s
            )
            attempt += 1
            bridge._count("outbound_disconnects")
            logger.warning(
                "mqtt: replies' connection to %s lost or refused (%s); retrying in %.1fs "
                "(replies wait meanwhile; the broker must accept client id %r)",
                address,
                reason or "closed",
                delay,
                f"{bridge.settings.client_id}{OUTBOUND_CLIENT_SUFFIX}",
            )
            if await self._until_closing(asyncio.sleep(delay)):
                return


def full_jitter(attempt: int, base_s: float, cap_s: float) -> float:
    """`random() * min(cap, base * 2**attempt)`, at least 10 ms (AWS 'full jitter')."""
    return max(0.01, random.random() * min(cap_s, base_s * (2 ** min(attempt, 30))))


def retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text
