"""Where a client's agent is served: here, on another member (and at which address), or
nowhere right now (its partition is moving).

Each member advertises its client-facing addresses (`{"ws": "ws://host:port", "api":
"http://host:port", "tcp": "host:port"}`, or `"tcp_tls"` for a TLS device listener) in its
heartbeat record (`Ownership.addresses`); the partition records
say who owns what. `Router.decide(agent_id)` reads both, as this member last saw them (KV
watches keep them current), and never blocks.

WebSocket clients (`ws_hook`, installed on the WebSocket listener): a connection for an agent
served here is served as usual and remembered, so that it can be closed with 1012 ("service
restart": reconnect) the moment this member stops serving the agent's partition; a
connection for an agent another member serves is relayed to that member (`forward.relay`); a
connection while the partition moves is closed with 1013 ("try again later"). Both codes make
`gatewayd.client` (and gatewayd.js) reconnect, and the new connection is routed afresh.

TCP binary-frame devices (`tcp_hook`, on the TCP listener, once a HELLO authenticated here):
served here, or relayed byte for byte to the owner's TCP listener (`forward.TcpRelay`; the
owner authenticates the device again), or refused with ERROR SERVER_BUSY while the agent
moves; a device connected here is closed with CLOSE GOING_AWAY when its partition moves.
Devices already reconnect with backoff on both. A device that came over TLS (this member
terminated it) is relayed only to the owner's TLS listener, over TLS, verifying the owner's
certificate against `relay_ca_file` (`[cluster] relay_ca_file`; the system's CAs when unset):
never in plaintext (`tcp_target`).

Must never import the daemon's assembly (see the package docstring); of `protocols` only the
wire format (`protocols.frames`, for the ERROR frame a refused device gets): the listeners
call the hooks through their `router` attribute.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Counter

from gatewayd.cluster import forward
from gatewayd.cluster.naming import partition_of

logger = logging.getLogger(__name__)

MOVED_CODE = 1012  # "service restart": the agent is now served elsewhere, reconnect
MOVING_CODE = 1013  # "try again later": no member serves the agent's partition right now
GOING_AWAY = 1001  # TCP CLOSE: "reconnect with backoff" (protocols/FRAMES.md)


ROUTED = Counter(
    "gatewayd_cluster_routed_total",
    "Clients of agents another member serves: relayed (ws, tcp, tcp_tls), calls forwarded "
    "(rpc), or refused while the agent moves or cannot be relayed (ws_moving, tcp_moving)",
    ["outcome"],
)


@dataclass(frozen=True, slots=True)
class Decision:
    """`kind` is "local", "forward" (to `member` at `addresses`) or "unavailable"."""

    kind: Literal["local", "forward", "unavailable"]
    partition: int
    member: str = ""
    addresses: dict[str, str] | None = None
    reason: str = ""


def relay_tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The client context TLS devices are relayed with: it trusts `ca_file`'s CAs (PEM; the
    system's when None) and checks that the owner's certificate names its advertised host."""
    return ssl.create_default_context(cafile=ca_file)


class Router:
    """Routing for one cluster member (`member`: a `ClusterMember`, started); TLS devices are
    relayed with `relay_tls` (default: `relay_tls_context(None)`)."""

    def __init__(self, member: Any, *, relay_tls: ssl.SSLContext | None = None) -> None:
        self.member = member
        self.relay_tls = relay_tls or relay_tls_context(None)
        self._warned: set[str] = set()  # owners whose TLS devices could not be relayed
        self._local: dict[int, weakref.WeakSet[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._relays: weakref.WeakSet[forward.TcpRelay] = weakref.WeakSet()
        self.forwarded = 0  # WebSocket and TCP connections relayed to another member
        member.partition_moving.append(self._partition_moving)

    # -- addresses -----------------------------------------------------------------------

    def advertise(self, addresses: dict[str, str]) -> None:
        """This member's client-facing addresses; the next heartbeat carries them."""
        self.member.ownership.addresses = dict(addresses)

    # -- decisions -----------------------------------------------------------------------

    def decide(self, agent_id: str) -> Decision:
        member = self.member
        number = partition_of(agent_id, member.settings.partitions)
        held = member.partitions.get(number)
        if held is not None:
            if held.state == "serving":
                return Decision("local", number)
            return Decision("unavailable", number, reason=f"partition {number} is {held.state}")
        ownership = member.ownership
        record = ownership.records.get(number)
        if record is None or not record.owner or record.owner == member.name:
            return Decision("unavailable", number, reason=f"partition {number} has no owner yet")
        if record.owner not in ownership.alive():
            return Decision(
                "unavailable", number, reason=f"partition {number}: owner {record.owner} is silent"
            )
        info = ownership.member_info.get(record.owner, {})
        addresses = info.get("addresses") if isinstance(info, dict) else None
        if not isinstance(addresses, dict):
            addresses = {}
        return Decision(
            "forward", number, record.owner, {str(k): str(v) for k, v in addresses.items()}
        )

    # -- WebSocket -----------------------------------------------------------------------

    def ws_hook(self, route: Any, ws: Any) -> Awaitable[None] | None:
        """The WebSocket listener's router: None to serve `ws` here, else an awaitable that
        serves it (relays it to the owner, or closes it)."""
        decision = self.decide(route.agent_id)
        if decision.kind == "local":
            self._local.setdefault(decision.partition, weakref.WeakSet()).add(ws)
            return None
        request = ws.request
        already = request.headers.get(forward.FORWARDED_HEADER) if request is not None else None
        url = (decision.addresses or {}).get("ws")
        if decision.kind == "unavailable" or not url or already:
            reason = decision.reason or (
                f"partition {decision.partition}: owner {decision.member} "
                + ("has no WebSocket address" if not url else "does not serve it yet")
            )
            ROUTED.labels("ws_moving").inc()
            return _close(ws, MOVING_CODE, f"agent moving ({reason}); try again")
        self.forwarded += 1
        ROUTED.labels("ws").inc()
        return forward.relay(ws, url, self.member.name)

    # -- TCP binary-frame devices ---------------------------------------------------------

    def tcp_hook(self, route: Any, transport: Any, first: bytes) -> asyncio.Protocol | None:
        """The TCP listener's router, once a device's HELLO authenticated here: None to serve
        it here, else a protocol that takes the connection over (relays it to the owner's TCP
        listener, or refuses it with ERROR SERVER_BUSY while the agent moves)."""
        decision = self.decide(route.agent_id)
        if decision.kind == "local":
            return None
        came_over_tls = transport.get_extra_info("sslcontext") is not None
        target = None
        if decision.kind == "forward":
            target = tcp_target(decision.addresses or {}, came_over_tls)
        if target is None:
            reason = decision.reason or self._no_tcp_target(decision, came_over_tls)
            ROUTED.labels("tcp_moving").inc()
            return forward.TcpRefusal(_busy_frame(f"agent moving ({reason}); reconnect"))
        host, port, over_tls = target
        self.forwarded += 1
        ROUTED.labels("tcp_tls" if over_tls else "tcp").inc()
        relay = forward.TcpRelay(
            host,
            port,
            first,
            _busy_frame("the agent's member is unreachable"),
            tls=self.relay_tls if over_tls else None,
        )
        self._relays.add(relay)
        return relay

    def _no_tcp_target(self, decision: Decision, tls: bool) -> str:
        owner = decision.member
        if not tls or "tcp" not in (decision.addresses or {}):  # (not advertised yet)
            return f"owner {owner} has no TCP address"
        if owner not in self._warned:  # a plain listener only: a configuration to fix
            self._warned.add(owner)
            logger.warning(
                "cluster: TLS devices of agents owned by %s are refused: it advertises no TLS "
                "TCP listener, and a TLS device is never relayed in plaintext (give every "
                "member the same [listeners.binary] TLS settings)",
                owner,
            )
        return f"owner {owner} has no TLS TCP listener"

    def close_relays(self) -> None:
        """Close every relayed TCP device (the member stops; its TCP listener does not know
        them any more). The devices reconnect with backoff, to another member."""
        for relay in list(self._relays):
            relay.close()

    # -- partitions moving away ------------------------------------------------------------

    def _partition_moving(self, number: int) -> None:
        partitions = self.member.settings.partitions
        devices = 0
        for key, conn in self.member.runtime.open_connections():
            link = getattr(conn, "link", None)
            if (
                getattr(link, "transport", "") == "tcp"
                and partition_of(key[1], partitions) == number
            ):
                link.close(GOING_AWAY, "agent moved to another member")  # type: ignore[union-attr]
                devices += 1
        if devices:
            logger.info(
                "cluster: partition %d moves: %d TCP devices told to reconnect", number, devices
            )
        connections = self._local.pop(number, None)
        if not connections:
            return
        loop = asyncio.get_running_loop()
        for ws in list(connections):
            task = loop.create_task(_close(ws, MOVED_CODE, "agent moved to another member"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        logger.info(
            "cluster: partition %d moves: %d WebSocket clients told to reconnect",
            number,
            len(connections),
        )


def tcp_target(addresses: dict[str, str], tls: bool) -> tuple[str, int, bool] | None:
    """Where to relay a TCP device on the owner that advertised `addresses`: `(host, port,
    over TLS)`, or None. A device that came over TLS (`tls`) goes only to the owner's TLS
    listener ("tcp_tls"), never to a plaintext one; a plain device to its plain listener
    ("tcp"), else to its TLS one."""
    for key in ("tcp_tls",) if tls else ("tcp", "tcp_tls"):
        host, _, port = addresses.get(key, "").rpartition(":")
        if host and port.isdigit():
            return host.strip("[]"), int(port), key == "tcp_tls"
    return None


def _busy_frame(reason: str) -> bytes:
    from protocols.frames import Error, ErrorCode, encode

    return encode(Error(ErrorCode.SERVER_BUSY, reason.encode()[:200].decode(errors="ignore")))


async def _close(ws: Any, code: int, reason: str) -> None:
    try:
        await ws.close(code, reason.encode()[:120].decode(errors="ignore"))
    except Exception as err:  # already closed, or the socket failed: nothing to tell
        logger.debug("cluster: closing a WebSocket client failed: %s", err)


def advertised_host(bind_host: str, configured: str) -> str:
    """The host other members and clients reach this member at: `configured`, else the
    listener's own bind host, else (bound to every interface) this machine's name."""
    if configured:
        return configured
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    return socket.getfqdn()
