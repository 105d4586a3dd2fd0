"""Relays one WebSocket client to the member that serves its agent.

The client connected here (`downstream`) stays connected here; this member opens the same
path (query included) on the owner's WebSocket listener with the client's own headers
(`Authorization` and the rest, minus the handshake's hop-by-hop ones), marked with
`X-Gatewayd-Forwarded-By` (a member never relays a relayed connection again: no loops while
members disagree about an owner), and copies frames both ways, text as text and binary as
binary, untouched. Whichever side closes first, the other is closed with the same code; an
owner that vanishes (killed, cut off) closes the client with 1012 so that it reconnects and
is routed to the next owner. An owner that cannot be reached at all closes it with 1013.

TCP binary-frame devices (`TcpRelay`): the bytes after the device's HELLO, relayed to the
owner's TCP listener; a device that reached this member over TLS is relayed over TLS to the
owner's TLS listener, whose certificate is verified (`tls`: the relaying member's client
context, `[cluster] relay_ca_file`), so its bytes never cross the network in plaintext.

Must never import the daemon's assembly nor `protocols`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

logger = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Gatewayd-Forwarded-By"
OPEN_TIMEOUT_S = 5.0
_HOP_BY_HOP = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "content-length",
        "transfer-encoding",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        FORWARDED_HEADER.lower(),
    }
)


def forwarded_headers(downstream: Any, member: str) -> list[tuple[str, str]]:
    """The client's handshake headers to send on, plus where the connection came from."""
    request = downstream.request
    headers = [
        (name, value)
        for name, value in (request.headers.raw_items() if request is not None else [])
        if name.lower() not in _HOP_BY_HOP
    ]
    remote = downstream.remote_address
    if remote:
        headers.append(("X-Forwarded-For", str(remote[0])))
    headers.append((FORWARDED_HEADER, member))
    return headers


async def relay(downstream: Any, owner_url: str, member: str) -> None:
    """Serve `downstream` (a server-side connection) by relaying it to `owner_url`."""
    request = downstream.request
    url = owner_url.rstrip("/") + (request.path if request is not None else "/")
    try:
        upstream = await connect(
            url,
            additional_headers=forwarded_headers(downstream, member),
            max_size=None,  # the owner enforces its own frame limit
            compression=None,
            open_timeout=OPEN_TIMEOUT_S,
        )
    except InvalidStatus as err:
        status = err.response.status_code
        body = err.response.body.decode(errors="replace").strip()
        code = 1008 if status == 404 else 1013  # 404: a path the owner refuses for good
        await _close(downstream, code, f"owner answered HTTP {status}: {body}")
        return
    except (OSError, TimeoutError, WebSocketException) as err:
        logger.info("cluster: relay to %s failed: %s", url, err)
        await _close(downstream, 1013, "the agent's member is unreachable; try again")
        return
    async with upstream:
        await _pump_both(downstream, upstream)


async def _pump_both(downstream: Any, upstream: ClientConnection) -> None:
    to_owner = asyncio.ensure_future(_pump(downstream, upstream))
    to_client = asyncio.ensure_future(_pump(upstream, downstream))
    try:
        done, _ = await asyncio.wait({to_owner, to_client}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_owner, to_client):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if to_client in done:  # the owner closed (or vanished): tell the client why
        code, reason = upstream.close_code, upstream.close_reason or ""
        if code is None or not _sendable(code):
            code, reason = 1012, "the agent's member went away; reconnect"
        await _close(downstream, code, reason)
    else:  # the client closed: close the owner's side the same way
        code, reason = downstream.close_code, downstream.close_reason or ""
        if code is None or not _sendable(code):
            code, reason = 1000, ""
        await _close(upstream, code, reason)


async def _pump(source: Any, sink: Any) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in source:
            await sink.send(message)


def _sendable(code: int) -> bool:
    """A close code an endpoint may send (RFC 6455 reserves 1005, 1006, 1015)."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


async def _close(connection: Any, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await connection.close(code, reason.encode()[:120].decode(errors="ignore"))


# -- TCP binary-frame devices -----------------------------------------------------------------


class TcpRelay(asyncio.Protocol):
    """Takes over one device's TCP connection once its HELLO authenticated here (the TCP
    listener hands it over with the bytes received so far, decrypted when the device came
    over TLS) and relays it, byte for byte, to the owner's TCP listener, which authenticates
    the device again and serves it; with `tls`, over TLS, checking that the owner's
    certificate chains to `tls`'s CAs and names `host`. Either side closing closes the other;
    a device that is not reading pauses the owner's side, and the other way round. An owner
    that cannot be reached (or whose certificate does not verify): the device gets ERROR
    SERVER_BUSY ("reconnect with backoff") and the connection closes."""

    def __init__(
        self,
        host: str,
        port: int,
        first: bytes,
        busy: bytes,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._first = first
        self._busy = busy
        self._tls = tls
        self.down: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self._opening: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.down = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]
        self._opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        assert self.down is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                up, _ = await loop.create_connection(
                    lambda: _TcpUpstream(self),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except ssl.SSLCertVerificationError as err:  # a misconfiguration, not a loss: say so
            logger.warning(
                "cluster: relay to tls %s:%d failed: %s (the owner's [listeners.binary] "
                "certificate must name %s and chain to [cluster] relay_ca_file)",
                self._host,
                self._port,
                err,
                self._host,
            )
            self._refuse()
            return
        except (OSError, TimeoutError) as err:
            scheme = "tls" if self._tls is not None else "tcp"
            logger.info(
                "cluster: relay to %s %s:%d failed: %s", scheme, self._host, self._port, err
            )
            self._refuse()
            return
        if self.down.is_closing():
            up.close()
            return
        self.up = up  # type: ignore[assignment]
        up.write(self._first)  # type: ignore[attr-defined]
        self.down.resume_reading()

    def _refuse(self) -> None:
        if self.down is not None and not self.down.is_closing():
            self.down.write(self._busy)
            self.down.close()

    def close(self) -> None:
        if self.down is not None:
            self.down.close()
        if self.up is not None:
            self.up.close()

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.up.write(data)

    def eof_received(self) -> bool:
        if self.up is not None and self.up.can_write_eof():
            self.up.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self.up is not None:
            self.up.close()

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None:
            self.up.resume_reading()


class _TcpUpstream(asyncio.Protocol):
    def __init__(self, relay: TcpRelay) -> None:
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        down = self._relay.down
        if down is not None and not down.is_closing():
            down.write(data)

    def eof_received(self) -> bool:
        down = self._relay.down
        if down is not None and not down.is_closing() and down.can_write_eof():
            down.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        down = self._relay.down
        if down is not None:
            down.close()

    def pause_writing(self) -> None:
        if self._relay.down is not None:
            self._relay.down.pause_reading()

    def resume_writing(self) -> None:
        if self._relay.down is not None:
            self._relay.down.resume_reading()


class TcpRefusal(asyncio.Protocol):
    """Takes over a device's connection only to send it one ERROR frame and close."""

    def __init__(self, frame: bytes) -> None:
        self._frame = frame

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._frame)  # type: ignore[attr-defined]
        transport.close()
