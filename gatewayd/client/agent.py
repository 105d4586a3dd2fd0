"""`AgentClient`: one agent over the JSON WebSocket protocol, kept in sync, reconnecting.

    async with AgentClient("ws://127.0.0.1:8765", "thermostat", "living-room") as agent:
        agent.on_state(lambda state: print("now", state))
        await agent.call("set_target", 22)              # -> 22.0, or a typed RpcError
        async for row in agent.stream("history", 3):   # a streaming @callable
            print(row)
        async for state in agent.changes():            # every state the gateway sends
            ...

The connection is opened by `connect()` (or `async with`), which returns once the gateway
sent the agent's identity and state. When the connection drops (a daemon restart, a network
cut, a 1013 "too slow" close) the client reconnects with exponential backoff; the gateway
sends the current state again on every connect, so `state` is restored and listeners see it.
Calls in flight when the connection dropped fail with `ConnectionLostError` (the gateway may
or may not have run them: the protocol has no call ids that survive a connection). A close
the gateway means for good (1008: unknown class, bad id, refused) ends the client.

A group of gateways (cluster mode): give every member's URL, `AgentClient([url1, url2,
...], ...)`. Any member serves any agent (a member relays a client to the agent's owner), so
the client connects to the first member that answers and moves on to the next one when a
member cannot be reached (killed, restarting). When the agent's owner changes, the member
closes the connection with 1012 or 1013 and the client reconnects and is routed to the new
owner; while no member serves the agent (a partition moving), 1013 closes are retried, also
during the first `connect()` (bounded by `connect_timeout_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from gatewayd.client.errors import (
    ClientError,
    ConnectionLostError,
    ProtocolError,
    StateRejectedError,
    rpc_error,
)

log = logging.getLogger(__name__)

StateListener = Callable[[Any], None]
ErrorListener = Callable[[ClientError], None]
MessageListener = Callable[[str | bytes], None]

# Close codes after which reconnecting cannot help: the gateway refused this agent or route.
PERMANENT_CLOSE_CODES = frozenset({1008, 1009})
# Close codes after which trying again soon can help, even before the first connection was
# ready: going away (a member stopping), service restart (the agent moved to another member),
# try again later (too slow, or the agent's partition is moving between members).
RETRY_CLOSE_CODES = frozenset({1001, 1012, 1013})
_END = object()


def agent_url(url: str, agent_class: str, agent_id: str, query: dict[str, str] | None) -> str:
    """`ws://host:port` + `/agents/{class}/{id}` (percent-encoded, `/` in an id too)."""
    base = url.rstrip("/")
    if "/agents/" in base:
        raise ValueError(f"give the gateway's base URL (ws://HOST:PORT), not an agent's: {url!r}")
    path = f"{base}/agents/{quote(agent_class, safe='')}/{quote(agent_id, safe='')}"
    return f"{path}?{urlencode(query)}" if query else path


class RpcCall:
    """One call in flight: an async iterator of its chunks (streaming methods), then
    `await call.result()` (or `await call`) for the final value."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._chunks: asyncio.Queue[Any] = asyncio.Queue()
        self._result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def _chunk(self, chunk: Any) -> None:
        self._chunks.put_nowait(chunk)

    def _finish(self, result: Any) -> None:
        if not self._result.done():
            self._result.set_result(result)
        self._chunks.put_nowait(_END)

    def _fail(self, err: BaseException) -> None:
        if not self._result.done():
            self._result.set_exception(err)
            self._result.exception()  # raised to whoever awaits; no "never retrieved"
        self._chunks.put_nowait(_END)

    @property
    def done(self) -> bool:
        return self._result.done()

    async def result(self) -> Any:
        """The method's return value (after every chunk), or its typed error."""
        return await asyncio.shield(self._result)

    def __await__(self) -> Any:
        return self.result().__await__()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            chunk = await self._chunks.get()
            if chunk is _END:
                await self._result  # raises the call's error, if it failed
                return
            yield chunk


class AgentClient:
    """One agent (`agent_class`, `agent_id`) of the gateway at `url` (`ws://HOST:PORT`), or
    of a group of gateways at any of `url`'s URLs (tried in turn, see the module docstring).

    `token` is sent as `Authorization: Bearer ...` (for agents whose `on_connect` checks it);
    `query` adds URL parameters (e.g. `{"device": "1"}`). `reconnect=False` makes a dropped
    connection final. Backoff starts at `backoff_min_s` and doubles up to `backoff_max_s`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        agent_class: str,
        agent_id: str,
        *,
        token: str | None = None,
        query: dict[str, str] | None = None,
        on_state: StateListener | None = None,
        reconnect: bool = True,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        max_frame_bytes: int | None = 64 * 1024 * 1024,
    ) -> None:
        bases = [url] if isinstance(url, str) else list(url)
        if not bases:
            raise ValueError("give at least one gateway URL")
        self.urls = [agent_url(base, agent_class, agent_id, query) for base in bases]
        self._url_index = 0
        self.agent_class = agent_class
        self.agent_id = agent_id
        self.reconnect = reconnect
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._max_frame_bytes = max_frame_bytes
        self._state: Any = None
        self._has_state = False
        self._state_listeners: list[StateListener] = [on_state] if on_state else []
        self._error_listeners: list[ErrorListener] = []
        self._message_listeners: list[MessageListener] = []
        self._subscribers: set[asyncio.Queue[Any]] = set()
        self._calls: dict[str, RpcCall] = {}
        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready: asyncio.Event = asyncio.Event()
        self._first: asyncio.Future[None] | None = None
        self._closing = False
        self._closed_for_good: ClientError | None = None
        self._previous_states: list[Any] = []  # the state before each recent set_state
        self.identity: dict[str, Any] = {}
        self.connects = 0  # how many times a connection was established (1 + reconnects)

    @property
    def url(self) -> str:
        """The agent's URL on the gateway this client connects to now."""
        return self.urls[self._url_index]

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> AgentClient:
        """Open the connection; returns once the gateway sent identity and state. Raises
        `ProtocolError` when the gateway refuses the agent, OSError when it is unreachable."""
        if self._runner is not None:
            raise ClientError("already connected")
        self._first = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(), name=f"gatewayd-client {self.url}")
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._first
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close the connection and stop reconnecting; calls in flight fail."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        runner, self._runner = self._runner, None
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        self._fail_calls(ConnectionLostError("the client was closed"))
        self._end_subscribers()

    async def __aenter__(self) -> AgentClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Return once a connection is up (and its state received), e.g. after a reconnect."""
        async with asyncio.timeout(timeout_s):
            await self._ready.wait()

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> Any:
        """The agent's state as last received (or as this client last set it)."""
        return self._state

    def on_state(self, listener: StateListener) -> Callable[[], None]:
        """Call `listener(state)` on every state change; returns a function that removes it."""
        self._state_listeners.append(listener)
        return lambda: self._state_listeners.remove(listener)

    def on_error(self, listener: ErrorListener) -> Callable[[], None]:
        """Call `listener(err)` for errors not tied to a call: `gw.error`, refused set_state."""
        self._error_listeners.append(listener)
        return lambda: self._error_listeners.remove(listener)

    def on_message(self, listener: MessageListener) -> Callable[[], None]:
        """Call `listener(data)` for frames that are not protocol frames (the agent's own
        `conn.send`/`broadcast`)."""
        self._message_listeners.append(listener)
        return lambda: self._message_listeners.remove(listener)

    async def changes(self) -> AsyncIterator[Any]:
        """Every state from now on (not the current one), until the client closes."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (state := await queue.get()) is not _END:
                yield state
        finally:
            self._subscribers.discard(queue)

    async def wait_for_state(self, predicate: Callable[[Any], bool], timeout_s: float) -> Any:
        """The first state (the current one included) for which `predicate` is true."""
        if self._has_state and predicate(self._state):
            return self._state
        async with asyncio.timeout(timeout_s):
            async for state in self.changes():
                if predicate(state):
                    return state
        raise ConnectionLostError("the client closed while waiting for a state")

    async def set_state(self, state: Any) -> None:
        """Replace the agent's state (`gw.set_state`). `state` changes here at once; if the
        gateway refuses it (read-only connection, `validate_state_change`), `state` goes back
        to what it was before the latest `set_state` and the error listeners get a
        `StateRejectedError` (the protocol answers only refusals, without naming which)."""
        self._previous_states = [*self._previous_states[-99:], self._state]
        await self._send({"type": "gw.set_state", "state": state})
        self._set_state(state)

    # -- calls -----------------------------------------------------------------------------

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the agent's `@callable` `method`; its return value, or a typed `RpcError`."""
        call, rpc_id, frame = self._new_call(method, args, kwargs)
        if rpc_id:
            await self._send_for(call, rpc_id, frame)
        return await call._result

    def stream(self, method: str, *args: Any, **kwargs: Any) -> RpcCall:
        """Call a streaming `@callable`: iterate the result for its chunks, then
        `await call.result()` for its return value. The frame is sent at once."""
        call, rpc_id, frame = self._new_call(method, args, kwargs)
        if rpc_id:
            task = asyncio.ensure_future(self._send_for(call, rpc_id, frame))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return call

    def _new_call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[RpcCall, str, dict[str, Any]]:
        """A registered call and its frame; no id when it failed at once (not connected)."""
        call = RpcCall(method)
        if self._ws is None or not self._ready.is_set():
            call._fail(self._not_connected())
            return call, "", {}
        rpc_id = str(next(self._ids))
        self._calls[rpc_id] = call
        frame: dict[str, Any] = {"type": "gw.rpc", "id": rpc_id, "method": method}
        if args:
            frame["args"] = list(args)
        if kwargs:
            frame["kwargs"] = kwargs
        return call, rpc_id, frame

    async def send_message(self, message: str | bytes) -> None:
        """Send user data (delivered to the agent's `on_message` untouched)."""
        ws = self._ws
        if ws is None:
            raise self._not_connected()
        try:
            await ws.send(message)
        except ConnectionClosed:
            raise ConnectionLostError("the connection closed while sending") from None

    # -- subclasses (ChatClient) -----------------------------------------------------------

    def _handle_frame(self, frame: dict[str, Any]) -> bool:
        """Handle a frame this class does not know; True if handled."""
        return False

    def _on_connected(self, reconnected: bool) -> None:
        """Called once the identity and state of a (re)connection arrived."""

    def _on_disconnected(self) -> None:
        """Called when a connection dropped (before any reconnect)."""

    async def _send(self, frame: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None or not self._ready.is_set():
            raise self._not_connected()
        try:
            await ws.send(json.dumps(frame, separators=(",", ":")))
        except ConnectionClosed:
            raise ConnectionLostError("the connection closed while sending") from None

    # -- internals -------------------------------------------------------------------------

    def _not_connected(self) -> ClientError:
        if self._closed_for_good is not None:
            return self._closed_for_good
        return ConnectionLostError(f"not connected to {self.url} (reconnecting)")

    async def _send_for(self, call: RpcCall, rpc_id: str, frame: dict[str, Any]) -> None:
        try:
            await self._send(frame)
        except ClientError as err:
            self._calls.pop(rpc_id, None)
            call._fail(err)

    async def _run(self) -> None:
        attempt = 0
        unreachable = 0  # URLs in a row that could not be reached
        while not self._closing:
            reached = was_ready = False
            try:
                async with connect(
                    self.url,
                    additional_headers=self._headers,
                    max_size=self._max_frame_bytes,
                    open_timeout=self.connect_timeout_s,
                ) as ws:
                    reached = True
                    unreachable = 0
                    self._ws = ws
                    await self._read(ws)
                    code = ws.close_code
                    reason = ws.close_reason or ""
            except (OSError, TimeoutError, WebSocketException) as err:
                code, reason = None, str(err)
                if isinstance(err, InvalidStatus) and err.response.status_code == 404:
                    code = 1008
                    reason = err.response.body.decode(errors="replace").strip() or "HTTP 404"
                elif not reached:  # this gateway is unreachable: the next URL is tried
                    unreachable += 1
                    self._url_index = (self._url_index + 1) % len(self.urls)
                    if (
                        self._first is not None
                        and not self._first.done()
                        and unreachable >= len(self.urls)
                    ):
                        self._first.set_exception(err)  # the first connect fails at once
                        return
            finally:
                was_ready = self._ready.is_set()
                self._ws = None
                self._ready.clear()
                if was_ready:
                    self._on_disconnected()
                self._fail_calls(ConnectionLostError(f"connection to {self.url} closed"))
            if was_ready:
                attempt = 0
            first_pending = self._first is not None and not self._first.done()
            if (
                code in PERMANENT_CLOSE_CODES
                or (code is not None and 4000 <= code < 5000)
                or (first_pending and code is not None and code not in RETRY_CLOSE_CODES)
            ):
                refused = ProtocolError(
                    f"{self.url}: the gateway closed the connection ({code}: {reason})"
                )
                self._closed_for_good = refused
                if self._first is not None and not self._first.done():
                    self._first.set_exception(refused)
                self._end_subscribers()
                return
            if self._closing or (not self.reconnect and not first_pending):
                self._closed_for_good = ConnectionLostError(
                    f"{self.url}: connection closed ({code})"
                )
                self._end_subscribers()
                return
            if not reached and 0 < unreachable < len(self.urls):
                continue  # another URL not tried yet in this round: at once
            delay = min(self.backoff_max_s, self.backoff_min_s * 2**attempt)
            attempt += 1
            log.debug(
                "gatewayd client: %s closed (%s %s); reconnecting in %.2fs",
                self.url,
                code,
                reason,
                delay,
            )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _read(self, ws: ClientConnection) -> None:
        identified = False
        try:
            async for data in ws:
                if isinstance(data, bytes) or not data.startswith("{"):
                    self._deliver_message(data)
                    continue
                try:
                    frame = json.loads(data)
                except ValueError:
                    self._deliver_message(data)
                    continue
                kind = frame.get("type") if isinstance(frame, dict) else None
                if not isinstance(kind, str) or not kind.startswith("gw."):
                    self._deliver_message(data)
                    continue
                if kind == "gw.identity":
                    self.identity = {k: v for k, v in frame.items() if k != "type"}
                    identified = True
                elif kind == "gw.state":
                    self._previous_states.clear()
                    self._set_state(frame.get("state"))
                    if identified and not self._ready.is_set():
                        self.connects += 1
                        self._ready.set()
                        if self._first is not None and not self._first.done():
                            self._first.set_result(None)
                        self._on_connected(self.connects > 1)
                else:
                    self._dispatch(kind, frame)
        except ConnectionClosed:
            pass

    def _dispatch(self, kind: str, frame: dict[str, Any]) -> None:
        if kind == "gw.rpc_result":
            rpc_id = str(frame.get("id"))
            call = self._calls.get(rpc_id)
            if call is None:
                return
            if not frame.get("ok", False):
                del self._calls[rpc_id]
                call._fail(rpc_error(call.method, str(frame.get("error", "failed"))))
            elif frame.get("done", True):
                del self._calls[rpc_id]
                call._finish(frame.get("result"))
            else:
                call._chunk(frame.get("chunk"))
        elif kind == "gw.state_error":
            # Only refusals are answered: assume the latest set_state was the refused one.
            if self._previous_states:
                self._set_state(self._previous_states.pop())
            self._report(StateRejectedError(str(frame.get("error", "state refused"))))
        elif kind == "gw.error":
            if not self._handle_frame(frame):
                self._report(ProtocolError(str(frame.get("error", "protocol error"))))
        elif not self._handle_frame(frame):
            log.debug("gatewayd client: ignoring frame %s", kind)

    def _set_state(self, state: Any) -> None:
        self._state = state
        self._has_state = True
        for listener in list(self._state_listeners):
            try:
                listener(state)
            except Exception:
                log.exception("gatewayd client: a state listener failed")
        for queue in self._subscribers:
            queue.put_nowait(state)

    def _report(self, err: ClientError) -> None:
        if not self._error_listeners:
            log.warning("gatewayd client: %s", err)
        for listener in list(self._error_listeners):
            try:
                listener(err)
            except Exception:
                log.exception("gatewayd client: an error listener failed")

    def _deliver_message(self, data: str | bytes) -> None:
        for listener in list(self._message_listeners):
            try:
                listener(data)
            except Exception:
                log.exception("gatewayd client: a message listener failed")

    def _fail_calls(self, err: ClientError) -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call._fail(err)

    def _end_subscribers(self) -> None:
        for queue in self._subscribers:
            queue.put_nowait(_END)
