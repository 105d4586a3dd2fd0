"""Blocking wrappers for scripts: the async clients on an event loop in a background thread.

    with SyncAgentClient("ws://127.0.0.1:8765", "thermostat", "living-room") as agent:
        agent.call("set_target", 22)
        print(agent.state)
        for row in agent.stream("history", 3):
            print(row)

Listeners (`on_state`, ...) run on the background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from gatewayd.client.agent import AgentClient
from gatewayd.client.chat import ChatClient, ChatResponse, Message

T = TypeVar("T")
_END = object()


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="gatewayd-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class SyncAgentClient:
    """`AgentClient` with blocking methods; same arguments."""

    _client_type: type[AgentClient] = AgentClient

    def __init__(
        self, url: str | Sequence[str], agent_class: str, agent_id: str, **options: Any
    ) -> None:
        self._thread = _LoopThread()

        async def make() -> AgentClient:
            return self._client_type(url, agent_class, agent_id, **options)

        self._client = self._thread.run(make())

    @property
    def client(self) -> AgentClient:
        """The async client underneath (use it only on its own thread's loop)."""
        return self._client

    def connect(self) -> SyncAgentClient:
        self._thread.run(self._client.connect())
        return self

    def close(self) -> None:
        try:
            self._thread.run(self._client.close(), timeout_s=10)
        finally:
            self._thread.stop()

    def __enter__(self) -> SyncAgentClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def state(self) -> Any:
        return self._client.state

    @property
    def identity(self) -> dict[str, Any]:
        return self._client.identity

    def on_state(self, listener: Callable[[Any], None]) -> Callable[[], None]:
        return self._client.on_state(listener)

    def call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        return self._thread.run(self._client.call(method, *args, **kwargs), timeout_s)

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """The chunks of a streaming call; the final value is the generator's return value."""
        items: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> Any:
            call = self._client.stream(method, *args, **kwargs)
            async for chunk in call:
                items.put_nowait(chunk)
            return await call.result()

        future = asyncio.run_coroutine_threadsafe(pump(), self._thread.loop)
        while True:
            chunk = self._thread.run(_next_or_end(items, future))
            if chunk is _END:
                return future.result()
            yield chunk

    def set_state(self, state: Any) -> None:
        self._thread.run(self._client.set_state(state))

    def send_message(self, message: str | bytes) -> None:
        self._thread.run(self._client.send_message(message))

    def wait_for_state(self, predicate: Callable[[Any], bool], timeout_s: float) -> Any:
        return self._thread.run(self._client.wait_for_state(predicate, timeout_s))

    def changes(self, timeout_s: float | None = None) -> Iterator[Any]:
        """Every state from now on, blocking between them (until the client closes)."""
        items: asyncio.Queue[Any] = asyncio.Queue()
        started = threading.Event()

        async def pump() -> None:
            iterator = self._client.changes()
            first = asyncio.ensure_future(anext(iterator, _END))
            started.set()
            state = await first
            while state is not _END:
                items.put_nowait(state)
                state = await anext(iterator, _END)
            items.put_nowait(_END)

        asyncio.run_coroutine_threadsafe(pump(), self._thread.loop)
        started.wait(5)
        while (state := self._thread.run(items.get(), timeout_s)) is not _END:
            yield state


async def _next_or_end(items: asyncio.Queue[Any], future: Any) -> Any:
    getter = asyncio.ensure_future(items.get())
    done_waiter = asyncio.wrap_future(future)
    await asyncio.wait({getter, done_waiter}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    if not items.empty():
        return items.get_nowait()
    return _END


class SyncChatClient(SyncAgentClient):
    """`ChatClient` with blocking methods: `send` waits for the whole answer."""

    _client_type = ChatClient

    @property
    def chat(self) -> ChatClient:
        assert isinstance(self._client, ChatClient)
        return self._client

    @property
    def messages(self) -> list[Message]:
        return self.chat.messages

    def send(
        self, message: str | Message, timeout_s: float | None = None, **body: Any
    ) -> ChatResponse:
        async def ask() -> ChatResponse:
            response = await self.chat.send(message, **body)
            await response.wait()
            return response

        return self._thread.run(ask(), timeout_s)

    def get_messages(self) -> list[Message]:
        return self._thread.run(self.chat.get_messages())

    def approve(
        self,
        tool_call_id: str,
        approved: bool = True,
        reason: str | None = None,
        timeout_s: float | None = None,
    ) -> ChatResponse:
        """Approve (or deny) a waiting tool call; waits for the continuation to end."""

        async def answer() -> ChatResponse:
            response = await self.chat.approve(tool_call_id, approved, reason)
            await response.wait()
            return response

        return self._thread.run(answer(), timeout_s)

    def tool_result(
        self,
        tool_call_id: str,
        output: Any = None,
        *,
        error_text: str | None = None,
        timeout_s: float | None = None,
    ) -> ChatResponse:
        """Answer a client tool call; waits for the continuation to end."""

        async def answer() -> ChatResponse:
            response = await self.chat.tool_result(tool_call_id, output, error_text=error_text)
            await response.wait()
            return response

        return self._thread.run(answer(), timeout_s)
