"""`ChatClient`: a chat agent (`gw.chat.*` frames, protocols/PROTOCOL.md "Chat").

    async with ChatClient("ws://127.0.0.1:8765", "chat", "support-1") as chat:
        answer = await chat.send("Is room 2 warm?")
        async for chunk in answer:                  # start, text-delta, tool-call, ..., finish
            if chunk["type"] == "text-delta":
                print(chunk["delta"], end="")
        print(answer.status, chat.messages[-1])

Every chunk reaches a `ChatResponse` exactly once and in order, also across a reconnect: after
the connection comes back the client sends `gw.chat.resume` by itself, and chunks it already
has (by their `seq`) are skipped in the replay. Answers started by another client (a second
tab) or found streaming at connect time reach `on_response` listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from gatewayd.client.agent import AgentClient
from gatewayd.client.errors import ChatError, ClientError, ConnectionLostError

Message = dict[str, Any]
Chunk = dict[str, Any]
_END = object()


class ChatResponse:
    """One streamed answer: iterate it for its chunks; `text`, `status`, `tool_calls`."""

    def __init__(self, request: str, stream: str | None = None) -> None:
        self.request = request
        self.stream = stream
        self.chunks: list[Chunk] = []
        self.text = ""
        self.reasoning = ""
        # Tool calls by id: {"toolName", "input", "state", "output"|"error"|"approval"...}.
        self.tool_calls: dict[str, dict[str, Any]] = {}
        self.status: str | None = None  # complete, cancelled, error, interrupted, or None
        # Tool calls the answer paused on: [{"toolCallId", "toolName", "kind"}] (gw.chat.done).
        self.waiting: list[dict[str, Any]] = []
        self.message_id: str | None = None  # the message it writes (a continuation's start)
        self.error: str | None = None
        self.last_seq = -1
        self._early: dict[int, Chunk] = {}  # chunks ahead of a gap, by seq
        self._final: tuple[str, str | None] | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def finished(self) -> bool:
        return self._done.done()

    async def wait(self) -> str:
        """The final status, once the answer ended (raises ChatError for a refused send)."""
        return await asyncio.shield(self._done)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        seen = 0
        while True:
            # Chunks that arrived before iteration began are in `chunks` already.
            if seen < len(self.chunks):
                seen += 1
                yield self.chunks[seen - 1]
                continue
            if self._done.done():
                await self._done
                return
            await self._queue.get()

    def _add(self, seq: int, chunk: Chunk) -> None:
        """Take chunk `seq`: in order; a replayed one this client has is skipped, one that
        comes early (live chunks can overtake a resume's replay) waits for the gap to fill."""
        if seq <= self.last_seq:
            return
        self._early[seq] = chunk
        while self.last_seq + 1 in self._early:
            self.last_seq += 1
            self._apply(self._early.pop(self.last_seq))
        self._finish_if_complete()

    def _apply(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        kind = chunk.get("type")
        if kind == "start" and isinstance(chunk.get("messageId"), str):
            self.message_id = chunk["messageId"]
        if kind == "text-delta":
            self.text += str(chunk.get("delta", ""))
        elif kind == "reasoning-delta":
            self.reasoning += str(chunk.get("delta", ""))
        elif isinstance(kind, str) and kind.startswith("tool-"):
            call_id = chunk.get("toolCallId") or chunk.get("id")
            if isinstance(call_id, str):
                entry = self.tool_calls.setdefault(call_id, {})
                entry.update({k: v for k, v in chunk.items() if k != "type"})
                entry["state"] = kind
        self._queue.put_nowait(None)

    def _end(self, status: str, error: str | None = None) -> None:
        """The gateway said the answer ended; it finishes once no chunk is missing."""
        self._final = (status, error)
        self._finish_if_complete()

    def _flush(self) -> None:
        """No more chunks will come (the replay is over): apply what waits, gaps or not."""
        for seq in sorted(self._early):
            self.last_seq = seq
            self._apply(self._early.pop(seq))
        self._finish_if_complete()

    def _finish_if_complete(self) -> None:
        if self._final is not None and not self._early:
            self._finish(*self._final)

    def _finish(self, status: str, error: str | None = None) -> None:
        if self._done.done():
            return
        self.status, self.error = status, error
        self._done.set_result(status)
        self._queue.put_nowait(_END)

    def _fail(self, err: ClientError) -> None:
        if self._done.done():
            return
        self.status, self.error = "error", str(err)
        self._done.set_exception(err)
        self._done.exception()  # the error is raised to whoever waits; no "never retrieved"
        self._queue.put_nowait(_END)


class ChatClient(AgentClient):
    """An `AgentClient` for a chat agent; `messages` is the stored conversation."""

    def __init__(
        self, url: str | Sequence[str], agent_class: str, agent_id: str, **options: Any
    ) -> None:
        super().__init__(url, agent_class, agent_id, **options)
        self.messages: list[Message] = []
        self._responses: dict[str, ChatResponse] = {}  # by request id
        self._by_stream: dict[str, ChatResponse] = {}
        self._response_listeners: list[Callable[[ChatResponse], None]] = []
        self._messages_waiters: list[asyncio.Future[list[Message]]] = []
        self._resume_waiters: list[asyncio.Future[ChatResponse | None]] = []
        self._requests = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()
        self._cut_off: list[ChatResponse] = []  # answers streaming when the connection dropped

    async def connect(self) -> ChatClient:
        await super().connect()
        await self.get_messages()
        return self

    async def __aenter__(self) -> ChatClient:
        return await self.connect()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await super().close()
        lost = ConnectionLostError("the client was closed")
        for response in self._responses.values():
            response._fail(lost)
        waiters: list[asyncio.Future[Any]] = [*self._messages_waiters, *self._resume_waiters]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(lost)
                waiter.exception()

    def on_response(self, listener: Callable[[ChatResponse], None]) -> Callable[[], None]:
        """Call `listener(response)` for each answer this client did not start itself (another
        tab's, or one found streaming on connect) when its first chunk arrives."""
        self._response_listeners.append(listener)
        return lambda: self._response_listeners.remove(listener)

    @property
    def streaming(self) -> ChatResponse | None:
        """The answer that is streaming, if this client knows of one."""
        return next((r for r in self._responses.values() if not r.finished), None)

    # -- frames out ------------------------------------------------------------------------

    async def send(
        self,
        message: str | Message,
        *,
        client_tools: list[dict[str, Any]] | None = None,
        **body: Any,
    ) -> ChatResponse:
        """Append a user message (text, or a whole message dict) and ask for the answer.
        `client_tools` (`[{"name", "description"?, "parameters"?}]`) are tools this client
        runs (answer their calls with `tool_result`); other keyword fields reach the agent as
        `ctx.body`."""
        if client_tools is not None:
            body["clientTools"] = client_tools
        if isinstance(message, str):
            message = {
                "id": uuid.uuid4().hex,
                "role": "user",
                "parts": [{"type": "text", "text": message}],
            }
        request = f"py-{uuid.uuid4().hex[:8]}-{next(self._requests)}"
        response = ChatResponse(request)
        self._responses[request] = response
        self.messages = [*self.messages, message]
        try:
            await self._send(
                {**body, "type": "gw.chat.send", "id": request, "messages": self.messages}
            )
        except ClientError as err:
            self._responses.pop(request, None)
            response._fail(err)
            raise
        return response

    async def approve(
        self, tool_call_id: str, approved: bool = True, reason: str | None = None
    ) -> ChatResponse:
        """Approve (or deny) a tool call waiting in state `approval-requested`. Returns the
        response of the continuation the gateway streams once no call of the answer waits
        any more (with other calls still waiting, it starts when the last is answered)."""
        frame: dict[str, Any] = {
            "type": "gw.chat.tool_approval",
            "toolCallId": tool_call_id,
            "approved": approved,
        }
        if reason is not None:
            frame["reason"] = reason
        return await self._answer(frame)

    async def deny(self, tool_call_id: str, reason: str | None = None) -> ChatResponse:
        return await self.approve(tool_call_id, False, reason)

    async def tool_result(
        self, tool_call_id: str, output: Any = None, *, error_text: str | None = None
    ) -> ChatResponse:
        """Answer a client tool call (a `tool-call` chunk with `"client": true`)."""
        frame: dict[str, Any] = {"type": "gw.chat.tool_result", "toolCallId": tool_call_id}
        if error_text is not None:
            frame["errorText"] = error_text
        else:
            frame["output"] = output
        return await self._answer(frame)

    async def _answer(self, frame: dict[str, Any]) -> ChatResponse:
        request = f"py-{uuid.uuid4().hex[:8]}-{next(self._requests)}"
        response = ChatResponse(request)
        self._responses[request] = response
        try:
            await self._send({**frame, "id": request})
        except ClientError as err:
            self._responses.pop(request, None)
            response._fail(err)
            raise
        return response

    async def resume(self) -> ChatResponse | None:
        """Ask for the answer that is streaming (`gw.chat.resume`); None when nothing streams."""
        waiter: asyncio.Future[ChatResponse | None] = asyncio.get_running_loop().create_future()
        self._resume_waiters.append(waiter)
        await self._send({"type": "gw.chat.resume"})
        return await waiter

    async def cancel(self) -> None:
        """Stop the answer that is streaming (it ends `cancelled`)."""
        await self._send({"type": "gw.chat.cancel"})

    async def clear(self) -> None:
        """Delete the conversation on the gateway."""
        await self._send({"type": "gw.chat.clear"})
        self.messages = []

    async def sync(self, messages: list[Message]) -> None:
        """Store `messages` as the conversation without asking for an answer."""
        self.messages = list(messages)
        await self._send({"type": "gw.chat.sync", "messages": self.messages})

    async def get_messages(self) -> list[Message]:
        """The stored conversation (also kept in `messages`)."""
        waiter: asyncio.Future[list[Message]] = asyncio.get_running_loop().create_future()
        self._messages_waiters.append(waiter)
        await self._send({"type": "gw.chat.get_messages"})
        return await waiter

    async def send_frame(self, frame_type: str, **fields: Any) -> None:
        """Send any `gw.chat.*` frame (e.g. one a newer gateway documents)."""
        await self._send({**fields, "type": frame_type})

    # -- frames in -------------------------------------------------------------------------

    def _handle_frame(self, frame: dict[str, Any]) -> bool:
        kind = frame.get("type")
        if kind == "gw.chat.chunk":
            response = self._response_for(frame)
            seq = frame.get("seq")
            chunk = frame.get("chunk")
            if isinstance(seq, int) and isinstance(chunk, dict):
                response._add(seq, chunk)
        elif kind == "gw.chat.done":
            response = self._response_for(frame)
            waiting = frame.get("waiting")
            response.waiting = waiting if isinstance(waiting, list) else []
            response._end(str(frame.get("status", "complete")), frame.get("error"))
            self._spawn(self._refresh_messages())
        elif kind == "gw.chat.resuming":
            response = self._response_for(frame)
            self._answer_resume(response)
        elif kind == "gw.chat.resume_none":
            self._answer_resume(None)
            # Answers that were streaming when the connection dropped ended meanwhile.
            unfinished = [r for r in self._cut_off if not r.finished]
            self._cut_off = []
            if unfinished:
                self._spawn(self._settle_offline(unfinished))
        elif kind == "gw.chat.messages":
            messages = frame.get("messages")
            if isinstance(messages, list):
                self.messages = messages
            waiters, self._messages_waiters = self._messages_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(self.messages)
        elif kind == "gw.chat.message_updated":
            message = frame.get("message")
            if isinstance(message, dict) and "id" in message:
                ids = [m.get("id") for m in self.messages]
                if message["id"] in ids:
                    self.messages = [
                        message if m.get("id") == message["id"] else m for m in self.messages
                    ]
                else:
                    self.messages = [*self.messages, message]
        elif kind == "gw.chat.cleared":
            self.messages = []
        elif kind == "gw.chat.error":
            err = ChatError(str(frame.get("error", "chat error")))
            request = frame.get("request")
            failed = self._responses.get(str(request)) if request is not None else None
            if failed is not None and not failed.chunks:
                failed._fail(err)
            else:
                self._report(err)
        elif kind == "gw.chat.replay_complete":
            self._response_for(frame)._flush()
        elif isinstance(kind, str) and kind.startswith("gw.chat."):
            pass  # a frame of a newer gateway: send_frame/raw listeners may use it
        else:
            return False
        return True

    def _response_for(self, frame: dict[str, Any]) -> ChatResponse:
        request = str(frame.get("request"))
        stream = frame.get("stream")
        response: ChatResponse | None = self._responses.get(request)
        if response is None and isinstance(stream, str):
            response = self._by_stream.get(stream)
        if response is None:
            response = ChatResponse(request, stream if isinstance(stream, str) else None)
            self._responses[request] = response
            for listener in list(self._response_listeners):
                listener(response)
        if isinstance(stream, str):
            response.stream = stream
            self._by_stream[stream] = response
        return response

    def _answer_resume(self, response: ChatResponse | None) -> None:
        waiters, self._resume_waiters = self._resume_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(response)

    def _on_connected(self, reconnected: bool) -> None:
        # Follow an answer that is streaming: the one this client was reading before the
        # connection dropped, or one another client started.
        self._cut_off = [r for r in self._responses.values() if not r.finished]
        self._spawn(self._send_quietly({"type": "gw.chat.resume"}))
        if reconnected:
            self._spawn(self._refresh_messages())

    def _on_disconnected(self) -> None:
        lost = ConnectionLostError("the connection closed")
        waiters: list[asyncio.Future[Any]] = [*self._messages_waiters, *self._resume_waiters]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(lost)
                waiter.exception()
        self._messages_waiters, self._resume_waiters = [], []

    async def _settle_offline(self, unfinished: list[ChatResponse]) -> None:
        await self._refresh_messages()
        last = self.messages[-1] if self.messages else None
        for response in unfinished:
            if last is not None and last.get("role") == "assistant":
                response.text = "".join(
                    str(p.get("text", "")) for p in last.get("parts", []) if p.get("type") == "text"
                )
            response._finish("ended while disconnected")

    async def _refresh_messages(self) -> None:
        with contextlib.suppress(ClientError):
            await self.get_messages()

    async def _send_quietly(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ClientError):
            await self._send(frame)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
