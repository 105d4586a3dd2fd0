"""Agent state as MCP resources, `agent://{class}/{id}` (the id percent-encoded), and the
change notifications sent to subscribed clients.

`StateNotifier` observes the runtime (`AgentRuntime.add_state_observer`: after each commit that
changed a state) and tells every subscriber of that agent's URI: clients on the 2025 protocol
that sent `resources/subscribe` get `notifications/resources/updated` on their session's
standalone stream; clients on the 2026 protocol get it on their `subscriptions/listen` stream.
Nothing is done for agents no one subscribed to.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated

log = logging.getLogger(__name__)

SCHEME = "agent"


def agent_uri(agent_class: str, agent_id: str) -> str:
    return f"{SCHEME}://{agent_class}/{quote(agent_id, safe='')}"


def parse_agent_uri(uri: str) -> tuple[str, str]:
    """(class, id) of an `agent://{class}/{id}` URI; ValueError naming the problem."""
    parts = urlsplit(str(uri))
    agent_id = unquote(parts.path.removeprefix("/"))
    if parts.scheme != SCHEME or not parts.netloc or not agent_id or parts.query:
        raise ValueError(f"not an agent state URI: {uri!r} (expected agent://CLASS/ID)")
    return parts.netloc, agent_id


class StateNotifier:
    def __init__(self) -> None:
        self.bus = InMemorySubscriptionBus()
        self._wanted: Counter[str] = Counter()  # URI -> subscriptions (both protocols)
        # URI -> {connection: its session}, for 2025-protocol subscribers.
        self._sessions: dict[str, dict[object, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop: Callable[[], None] | None = None

    def attach(self, runtime: Any) -> None:
        self._stop = runtime.add_state_observer(self._changed)

    async def close(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe_session(self, uri: str, connection: object, session: Any) -> None:
        sessions = self._sessions.setdefault(uri, {})
        if connection not in sessions:
            self._wanted[uri] += 1
        sessions[connection] = session

    def unsubscribe_session(self, uri: str, connection: object) -> None:
        sessions = self._sessions.get(uri)
        if sessions is not None and sessions.pop(connection, None) is not None:
            self._release([uri])
            if not sessions:
                del self._sessions[uri]

    def forget_connection(self, connection: object) -> None:
        for uri in [u for u, sessions in self._sessions.items() if connection in sessions]:
            self.unsubscribe_session(uri, connection)

    def listening(self, uris: Iterable[str]) -> Callable[[], None]:
        """Count a `subscriptions/listen` stream's URIs as wanted; returns its release."""
        uris = list(uris)
        self._wanted.update(uris)
        return lambda: self._release(uris)

    def _release(self, uris: list[str]) -> None:
        self._wanted.subtract(uris)
        for uri in uris:
            if self._wanted[uri] <= 0:
                del self._wanted[uri]

    # -- notifications ---------------------------------------------------------------------

    def _changed(self, agent_class: str, agent_id: str, state: Any) -> None:
        if not self._wanted:
            return
        uri = agent_uri(agent_class, agent_id)
        if uri not in self._wanted:
            return
        task = asyncio.get_running_loop().create_task(self._notify(uri))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self, uri: str) -> None:
        for connection, session in list(self._sessions.get(uri, {}).items()):
            try:
                await session.send_resource_updated(uri)
            except Exception as err:  # the client went away: forget its subscriptions
                log.info("mcp: dropping a subscriber of %s (%s)", uri, type(err).__name__)
                self.forget_connection(connection)
        await self.bus.publish(ResourceUpdated(uri=uri))
