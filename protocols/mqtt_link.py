"""What the MQTT bridge hands the gateway (`MqttLink`, one per device) and its own small
types: the connection states, the dead-letter sink it writes to, one pending inbound message.
Never imports gatewayd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from protocols.link import LinkIdentity, OutputAddress, Route
from protocols.mqtt_client import BridgeClient
from protocols.mqtt_outbound import Outbound
from protocols.mqtt_settings import RouteMatch

if TYPE_CHECKING:
    from protocols.mqtt import MqttBridge

__all__ = ["TRANSPORT", "ConnectionState", "DeadLetterSink", "Inbound", "LinkKey", "MqttLink"]

TRANSPORT = "mqtt"


class ConnectionState:
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


class MqttLink(LinkIdentity):
    """One device (route + id) as the gateway sees it; `send` publishes to its reply topic."""

    TRANSPORT = TRANSPORT
    __slots__ = ("_address", "_bridge", "_closed", "key", "reply_topic")

    def __init__(self, bridge: MqttBridge, match: RouteMatch, topic: str, reply_topic: str):
        super().__init__(f"mqtt:{topic}", Route(match.route.agent_class, match.device_id), topic)
        self._bridge = bridge
        self.key = (match.route_index, match.device_id)
        self.reply_topic = reply_topic
        self._closed = False
        self._address = OutputAddress(TRANSPORT, reply_topic, bridge.settings.qos)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def output_address(self) -> OutputAddress:
        return self._address

    @property
    def outputs(self) -> MqttBridge:
        return self._bridge

    def send(self, data: bytes | str) -> None:
        """Queue `data` (str as UTF-8) for the device's reply topic, untracked (a handler with
        an outbox uses `MqttBridge.send_tracked`); never blocks, never dropped for load."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._bridge._publisher.enqueue(
            Outbound(self.reply_topic, self._bridge.settings.qos, payload, self.key[0])
        )

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Forget this device's link (runs the agent's on_close); its next message opens a
        new link. MQTT devices have no session with us to tear down."""
        if not self._closed:
            self._closed = True
            self._bridge._link_closed_by_gateway(self, code, reason)

    def __repr__(self) -> str:
        return f"MqttLink({self._link_id!r} -> {self._route.agent_class}:{self._route.agent_id})"


class DeadLetterSink(Protocol):
    """Where poison messages go (`protocols.dead_letters.DeadLetterStore`); `add` blocks (the
    bridge calls it in a worker thread) and returns once the row is durable."""

    path: Any

    def add(
        self,
        *,
        topic: str,
        payload: bytes,
        qos: int,
        error: str,
        attempts: int,
        first_failed_at: float,
        last_failed_at: float,
    ) -> int: ...


LinkKey = tuple[int, str]  # (route index, device id)


@dataclass(slots=True)
class Inbound:
    """One message between 'pulled from the client' and 'acked' (or given up)."""

    client: BridgeClient
    mid: int
    qos: int
    topic: str
    match: RouteMatch
    payload: bytes
    seq: int  # arrival order, to keep a device's held messages in order
    attempts: int = 0  # failed turns so far (a backpressure refusal is not one)
    first_failed_at: float = 0.0  # Unix time of the first failed turn
    last_error: str = ""

    @property
    def key(self) -> LinkKey:
        return (self.match.route_index, self.match.device_id)
