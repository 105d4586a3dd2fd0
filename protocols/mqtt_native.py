"""The MQTT bridge's two broker connections on the native client (`protocols.mqttwire`),
built from `MqttSettings` with the same session semantics as the paho/aiomqtt ones
(`[mqtt] client = "native"`, the default; see README "MQTT" for the measurement)."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from protocols.mqtt_settings import BrokerAddress, MqttSettings
from protocols.mqttwire.aio import MqttClient
from protocols.mqttwire.codec import V5, V311, Will
from protocols.mqttwire.connection import ConnectOptions

__all__ = ["device_client", "outbound_client"]


def _options(
    settings: MqttSettings, client_id: str, *, persistent: bool, will: Will | None
) -> ConnectOptions:
    v5 = settings.protocol == "5"
    properties = {}
    if v5 and persistent:
        properties["session_expiry_interval"] = settings.session_expiry_s
        # Our window: the broker sends at most this many unacked QoS 1 messages.
        properties["receive_maximum"] = min(65_535, settings.max_pending_messages)
    return ConnectOptions(
        client_id,
        version=V5 if v5 else V311,
        clean_start=not persistent,
        keepalive=settings.keepalive_s,
        username=settings.username,
        password=None if settings.password is None else settings.password.encode(),
        will=will,
        properties=properties,
        max_inflight=settings.max_inflight_publishes,
    )


def device_client(
    settings: MqttSettings,
    address: BrokerAddress,
    ssl_context: ssl.SSLContext | None,
    *,
    will: tuple[str, bytes] | None,
    on_pause: Callable[[], None],
) -> MqttClient:
    """The device messages' connection: persistent session (3.1.1 clean_session=False; 5:
    clean_start=False with `session_expiry_s`), manual acks, the offline will."""
    options = _options(
        settings,
        settings.client_id,
        persistent=True,
        will=None if will is None else Will(will[0], will[1], qos=1, retain=True),
    )
    return MqttClient(
        address.host,
        address.port,
        options,
        ssl_context=ssl_context if address.tls else None,
        connect_timeout_s=settings.connect_timeout_s,
        high_water=settings.max_pending_messages,
        on_pause=on_pause,
    )


def outbound_client(
    settings: MqttSettings,
    address: BrokerAddress,
    ssl_context: ssl.SSLContext | None,
    client_id: str,
) -> MqttClient:
    """The replies' connection: clean session, no will, no subscriptions."""
    return MqttClient(
        address.host,
        address.port,
        _options(settings, client_id, persistent=False, will=None),
        ssl_context=ssl_context if address.tls else None,
        connect_timeout_s=settings.connect_timeout_s,
        high_water=settings.max_pending_messages,
    )
