"""Settings of the MQTT bridge and the route table that maps topics to agents.

Pure data and string handling (no sockets, no event loop), so it is tested without a broker.
A route topic has one `{id}` placeholder as a whole topic level (`devices/{id}/telemetry`);
it becomes the subscription filter `devices/+/telemetry`, and an incoming topic is matched
level by level to get the device id back. Ids may be any non-empty MQTT topic level (unicode,
long, `..`, spaces, `:` ...); MQTT itself forbids `/`, `+`, `#` and NUL inside a level.
A route may restrict which ids it accepts (`allowed_ids`, `allowed_id_pattern`) and how many
new agents it creates per minute (`max_new_agents_per_minute`); see `mqtt_admission`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ID_PLACEHOLDER = "{id}"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MAX_TOPIC_BYTES = 65_535  # MQTT's UTF-8 string length limit


class MqttConfigError(ValueError):
    """An MQTT setting is invalid; the message names the setting and what to change."""


OVERFLOW_POLICIES = ("backpressure", "drop_oldest")


@dataclass(frozen=True, slots=True)
class MqttRoute:
    """Messages on `topic` (with `{id}`) go to agent `(agent_class, id)`; replies that agent
    sends on the device's link are published to `reply_topic` with the same `{id}`.

    Admission (checked when an id has no open link): with `allowed_ids` and/or
    `allowed_id_pattern` (a regex that must match the whole id) set, only ids in the set or
    matching the pattern are served; `max_new_agents_per_minute` (0 = no cap) bounds how fast
    ids without an agent yet create one. Messages refused either way are acked and counted.

    `on_overflow` says what happens to this route's replies when the bridge's outbound
    backlog is over `max_outbound_queue`: "backpressure" (the default: nothing is dropped,
    the bridge stops reading device messages until the backlog shrinks) or "drop_oldest"
    (for replies that only matter while fresh, e.g. telemetry echoes: the oldest queued reply
    of this route is dropped, counted in `outbound_dropped_by_policy` and logged)."""

    topic: str
    agent_class: str
    reply_topic: str
    allowed_ids: frozenset[str] | None = None
    allowed_id_pattern: str | None = None
    max_new_agents_per_minute: int = 600
    on_overflow: str = "backpressure"

    def __post_init__(self) -> None:
        if self.on_overflow not in OVERFLOW_POLICIES:
            raise MqttConfigError(
                f"mqtt route {self.topic!r}: on_overflow must be one of "
                f"{', '.join(OVERFLOW_POLICIES)}, got {self.on_overflow!r}"
            )


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Everything the MQTT bridge needs; validated on construction (`MqttConfigError`).

    `password` is the secret itself: the config layer reads it from a password file.
    `protocol` is "3.1.1" (persistent session via clean_session=False) or "5" (clean_start
    False + `session_expiry_s`). `qos` is the subscription and reply QoS: 0 or 1 (QoS 2 is
    refused: paho keeps QoS 2 receive state only in memory, so a crash between PUBREC and the
    commit would lose the message).
    """

    broker_urls: tuple[str, ...] = ("mqtt://127.0.0.1:1883",)
    client_id: str = "gatewayd"
    routes: tuple[MqttRoute, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # a secret: never in logs
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip certificate and host name verification (testing only)
    protocol: str = "3.1.1"
    session_expiry_s: int = 24 * 3600  # MQTT 5 only; 3.1.1 sessions never expire
    keepalive_s: int = 30
    qos: int = 1
    status_topic: str = "gatewayd/{client_id}/status"  # "" disables online/offline status
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    retry_min_s: float = 0.2  # backoff for re-submitting a message whose turn failed
    retry_max_s: float = 30.0
    max_inflight_publishes: int = 100
    max_outbound_queue: int = 10_000
    max_pending_messages: int = 1_000
    # Messages of one device (route + id) handed to its agent and not yet committed; the rest
    # wait in the bridge, unacked, so that one device's backlog cannot fill the agent's
    # mailbox ahead of its other links (a TCP device, a dashboard).
    max_inflight_per_device: int = 32
    max_payload_bytes: int = 256 * 1024
    accept_retained: bool = False
    # A device link with no inbound message for this long is closed (its runtime connection
    # dropped); the device's next message opens it again. 0 = never.
    link_idle_timeout_s: float = 600.0
    # Failed turns per message before it is acked and dead-lettered; 0 = retry forever.
    max_attempts: int = 5
    publish_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    # "native": protocols.mqttwire (sans-I/O codec on asyncio.Protocol); "aiomqtt": paho via
    # aiomqtt (protocols.mqtt_client.ManualAckClient). See README "MQTT" for the numbers.
    client: str = "native"
    addresses: tuple[BrokerAddress, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.broker_urls, str | list):
            urls = (self.broker_urls,) if isinstance(self.broker_urls, str) else self.broker_urls
            object.__setattr__(self, "broker_urls", tuple(urls))
        if isinstance(self.routes, list):
            object.__setattr__(self, "routes", tuple(self.routes))
        object.__setattr__(self, "addresses", tuple(parse_broker_url(u) for u in self.broker_urls))
        self._validate()

    def _validate(self) -> None:
        if not self.addresses:
            raise MqttConfigError("mqtt.broker_urls: at least one broker URL is required")
        if not self.client_id:
            raise MqttConfigError(
                "mqtt.client_id: must be set (a fixed id is what lets the broker keep the "
                "session and its queued messages while gatewayd restarts)"
            )
        if self.protocol not in ("3.1.1", "5"):
            raise MqttConfigError(f"mqtt.protocol: {self.protocol!r} is not '3.1.1' or '5'")
        if self.client not in ("native", "aiomqtt"):
            raise MqttConfigError(f"mqtt.client: {self.client!r} is not 'native' or 'aiomqtt'")
        if self.qos not in (0, 1):
            raise MqttConfigError(
                f"mqtt.qos: {self.qos!r} is not 0 or 1 (QoS 2 is not crash-safe with paho: "
                "its receive state lives only in memory)"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise MqttConfigError("mqtt.cert_file and mqtt.key_file must be set together")
        if self.password is not None and self.username is None:
            raise MqttConfigError("mqtt.password is set but mqtt.username is not")
        for name in (
            "max_inflight_publishes",
            "max_outbound_queue",
            "max_pending_messages",
            "max_inflight_per_device",
        ):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("max_payload_bytes", self.max_payload_bytes)
        _require_positive_int("keepalive_s", self.keepalive_s)
        _require_positive_int("session_expiry_s", self.session_expiry_s)
        for low, high in (
            ("reconnect_min_s", "reconnect_max_s"),
            ("retry_min_s", "retry_max_s"),
        ):
            lo, hi = getattr(self, low), getattr(self, high)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise MqttConfigError(f"mqtt.{low}/{high}: need 0 < {low} <= {high}")
        if not (math.isfinite(self.link_idle_timeout_s) and self.link_idle_timeout_s >= 0):
            raise MqttConfigError("mqtt.link_idle_timeout: must be >= 0 seconds (0 = never)")
        if (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 0
        ):
            raise MqttConfigError(
                f"mqtt.max_attempts: {self.max_attempts!r} is not an integer >= 0 (0 = forever)"
            )
        for name in ("publish_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise MqttConfigError(f"mqtt.{name}: must be a positive number of seconds")
        if not self.routes:
            raise MqttConfigError("mqtt.routes: at least one route is required")
        RouteTable(self.routes)  # raises MqttConfigError naming the bad route

    @property
    def resolved_status_topic(self) -> str:
        return self.status_topic.replace("{client_id}", self.client_id)


def _require_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MqttConfigError(f"mqtt.{name}: {value!r} is not a positive integer")


def load_id_list(path: str) -> frozenset[str]:
    """The ids in an allow-list file: one id per line; blank lines and lines starting with
    `#` are ignored; surrounding whitespace is stripped."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MqttConfigError(f"cannot read the allowed_ids_file {path!r}: {exc}") from None
    stripped = (line.strip() for line in lines)
    return frozenset(line for line in stripped if line and not line.startswith("#"))


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:port]` or `mqtts://host[:port]` (IPv6 as `[::1]`)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MqttConfigError(f"mqtt.broker_urls: {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise MqttConfigError(
            f"mqtt.broker_urls: {url!r} must look like mqtt://host:1883 or mqtts://host:8883"
        )
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise MqttConfigError(
            f"mqtt.broker_urls: {url!r}: no path, query or credentials in the URL "
            "(use mqtt.username and the password file)"
        )
    return BrokerAddress(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
    )


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route_index: int
    route: MqttRoute
    device_id: str


MATCHES_CACHED = 10_000  # topics whose route match `RouteTable.match` remembers


class RouteTable:
    """Compiled routes: subscription filters, topic -> (route, id), id -> reply topic."""

    def __init__(self, routes: tuple[MqttRoute, ...]) -> None:
        self.routes = routes
        self._compiled: list[tuple[int, list[str], int]] = []  # (route index, levels, id level)
        filters: list[str] = []
        for index, route in enumerate(routes):
            where = f"mqtt.routes[{index}]"
            if not route.agent_class:
                raise MqttConfigError(f"{where}.agent_class: must not be empty")
            levels = route.topic.split("/")
            id_levels = [i for i, level in enumerate(levels) if level == ID_PLACEHOLDER]
            if len(id_levels) != 1 or route.topic.count(ID_PLACEHOLDER) != 1:
                raise MqttConfigError(
                    f"{where}.topic: {route.topic!r} needs exactly one '{{id}}' as a whole "
                    "topic level, e.g. 'devices/{id}/telemetry'"
                )
            if any(c in route.topic for c in "+#\0"):
                raise MqttConfigError(
                    f"{where}.topic: {route.topic!r} must not contain '+', '#' or NUL "
                    "(the bridge builds the wildcard filter from '{id}')"
                )
            if route.reply_topic.count(ID_PLACEHOLDER) != 1 or any(
                c in route.reply_topic for c in "+#\0"
            ):
                raise MqttConfigError(
                    f"{where}.reply_topic: {route.reply_topic!r} needs exactly one '{{id}}' "
                    "and no wildcards, e.g. 'devices/{id}/cmd'"
                )
            if route.allowed_id_pattern is not None:
                try:
                    re.compile(route.allowed_id_pattern)
                except re.error as exc:
                    raise MqttConfigError(
                        f"{where}.allowed_id_pattern: {route.allowed_id_pattern!r} is not a "
                        f"valid regular expression ({exc})"
                    ) from None
            limit = route.max_new_agents_per_minute
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise MqttConfigError(
                    f"{where}.max_new_agents_per_minute: {limit!r} is not an integer >= 0 "
                    "(0 = no cap)"
                )
            topic_filter = "/".join("+" if i == id_levels[0] else x for i, x in enumerate(levels))
            if topic_filter in filters:
                raise MqttConfigError(
                    f"{where}.topic: {route.topic!r} duplicates the filter of "
                    f"mqtt.routes[{filters.index(topic_filter)}]"
                )
            filters.append(topic_filter)
            self._compiled.append((index, levels, id_levels[0]))
        self.filters: tuple[str, ...] = tuple(filters)
        # Recent topics' matches: a device publishes on the same topic again and again.
        self._matches: dict[str, RouteMatch | None] = {}

    def match(self, topic: str) -> RouteMatch | None:
        """The route and device id for an incoming topic, or None if no route matches."""
        try:
            return self._matches[topic]
        except KeyError:
            pass
        found = self._match(topic)
        if len(self._matches) >= MATCHES_CACHED:
            self._matches.clear()  # any publisher picks its topics: keep the memory bounded
        self._matches[topic] = found
        return found

    def _match(self, topic: str) -> RouteMatch | None:
        levels = topic.split("/")
        for index, pattern, id_level in self._compiled:
            if len(levels) != len(pattern):
                continue
            if all(
                a == b
                for i, (a, b) in enumerate(zip(levels, pattern, strict=True))
                if i != id_level
            ):
                device_id = levels[id_level]
                if device_id:
                    return RouteMatch(index, self.routes[index], device_id)
        return None

    def reply_topic(self, route_index: int, device_id: str) -> str:
        return self.routes[route_index].reply_topic.replace(ID_PLACEHOLDER, device_id)
