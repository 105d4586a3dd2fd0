"""`ChatAgent`: an agent whose conversation lives in its own SQLite database.

    from gatewayd.chat import ChatAgent, OpenAICompatibleBackend

    class Assistant(ChatAgent):
        system_prompt = "You run the heating of this building."
        backend = OpenAICompatibleBackend(base_url="http://127.0.0.1:8000/v1", model="qwen")

Clients speak the `gw.chat.*` frames (protocols/PROTOCOL.md, "Chat"). A `gw.chat.send`
persists the conversation (store.py), then the answer is produced outside the turn, by a task
the runtime owns, and stored and sent in batches of chunks, each batch one turn of the agent
(streams.py). When the stream ends, its message is rebuilt from the stored chunks and
persisted. A stream cut by a stop or a crash is closed on the next wake, its partial message
rebuilt from what was stored. Override `on_chat_message(messages, ctx)` to produce the answer
another way; call `super().on_start()` if you override `on_start`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gatewayd.agents import Agent, Connection
from gatewayd.chat.backends import ModelBackend
from gatewayd.chat.messages import Chunk, InvalidMessageError, Message, MessageBuilder
from gatewayd.chat.store import MessageStore
from gatewayd.chat.streams import LIVE, LiveStream, StreamEnd, StreamRow, StreamStore
from protocols import chat as wire

_TASK = "chat-stream"
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class ChatContext:
    """What `on_chat_message` knows about the request besides the messages."""

    request_id: str
    stream_id: str
    connection_id: str
    body: dict[str, Any] = field(default_factory=dict)  # the client's extra request fields


class ChatAgent(Agent):
    """See the module docstring. Class attributes configure it."""

    backend: ClassVar[ModelBackend | None] = None
    system_prompt: ClassVar[str | None] = None
    max_persisted_messages: ClassVar[int | None] = None
    # Chunks stored and sent per turn at most (None: all that arrived during the last commit).
    stream_batch_max_chunks: ClassVar[int | None] = None

    # -- what a subclass overrides ----------------------------------------------------------

    def on_chat_message(self, messages: list[Message], ctx: ChatContext) -> AsyncIterator[Chunk]:
        """The answer to `messages` (full content, oldest first) as chunks (an async iterator,
        or an `async def` returning one). It runs outside any turn, in a task the runtime owns:
        `self.sql` and `set_state` are not available here (NotInTurnError)."""
        if self.backend is None:
            raise NotImplementedError(
                f"{type(self).__name__}: set `backend = ...` or override on_chat_message"
            )
        return self.backend.stream(messages, system=self.system_prompt)

    # -- reading ----------------------------------------------------------------------------

    @property
    def messages(self) -> list[Message]:
        """The stored conversation, in order (in a turn)."""
        return self._chat_stores()[0].load()

    def persist_messages(self, messages: list[Message]) -> list[Message]:
        """Store `messages` as the conversation (reconciled, guarded; in a turn)."""
        return self._chat_stores()[0].persist(messages)

    # -- runtime hooks ------------------------------------------------------------------------

    def on_start(self) -> Any:
        self._chat_stores()

    def on_error(self, err: BaseException) -> Any:
        # A turn rolled back: the write cache may name rows that are gone, and tables created
        # in it are gone too. Start again from the database on the next use.
        self.__dict__.pop("_chat_message_store", None)
        self.__dict__.pop("_chat_stream_store", None)
        return super().on_error(err)

    def on_protocol_frame(self, conn: Connection, frame_type: str, frame: dict[str, Any]) -> Any:
        self._chat_stores()
        raw_id = frame.get("id")
        request_id = str(raw_id) if isinstance(raw_id, str | int) else None
        if request_id is not None and len(request_id) > MAX_REQUEST_ID_CHARS:
            conn.send(wire.encode_error(f"'id' longer than {MAX_REQUEST_ID_CHARS} characters"))
            return
        try:
            if frame_type == wire.SEND:
                self._chat_send(conn, frame, request_id or uuid.uuid4().hex)
            elif frame_type == wire.RESUME:
                self._chat_resume(conn)
            elif frame_type == wire.CANCEL:
                live = self._live()
                if live is not None:
                    live.cancel()
            elif frame_type == wire.CLEAR:
                self._chat_clear()
            elif frame_type == wire.SYNC:
                stored = self.persist_messages(_message_list(frame))
                self._send_to_others(conn, wire.encode_messages(stored))
            elif frame_type == wire.GET_MESSAGES:
                conn.send(wire.encode_messages(self.messages))
            else:
                conn.send(wire.encode_error(f"unknown chat frame type {frame_type!r}", request_id))
        except InvalidMessageError as err:
            conn.send(wire.encode_error(str(err), request_id))

    # -- frames -----------------------------------------------------------------------------

    def _chat_send(self, conn: Connection, frame: dict[str, Any], request_id: str) -> None:
        if self._live() is not None:
            conn.send(
                wire.encode_error(
                    "an answer is still streaming; send gw.chat.cancel first", request_id
                )
            )
            return
        messages = self.persist_messages(_message_list(frame))
        self._send_to_others(conn, wire.encode_messages(self.messages))
        stream_id = uuid.uuid4().hex
        message_id = f"msg_{uuid.uuid4().hex}"
        self._chat_stores()[1].begin(stream_id, request_id, message_id)
        body = {k: v for k, v in frame.items() if k not in ("type", "id", "messages")}
        ctx = ChatContext(request_id, stream_id, conn.id, body)
        subscribers = {c.id for c in self.get_connections() if c.protocol_enabled}
        live = LiveStream(stream_id, request_id, subscribers)
        host = self._gw_host

        def submit(chunks_json: list[str], end: StreamEnd | None) -> Any:
            return host.submit(lambda agent: _as_chat(agent)._chat_batch(live, chunks_json, end))

        # If this turn rolls back, the stream row goes with it and the first batch finds
        # no stream: see _chat_batch.
        task = host.start_task(
            _TASK,
            live.run(
                lambda: self.on_chat_message(messages, ctx), submit, self.stream_batch_max_chunks
            ),
        )
        LIVE[task] = live

    def _chat_batch(self, live: LiveStream, chunks_json: list[str], end: StreamEnd | None) -> None:
        """One turn of a live stream: store `chunks_json`, send them; at `end`, close it."""
        _messages, streams = self._chat_stores()
        row = streams.get(live.stream_id)
        frames: list[str] = []
        if row is None or row.status != "streaming":
            # Its send was rolled back, or the chat was cleared: stop, store nothing, but
            # still end the stream for its clients (never leave one "streaming").
            live.cancel()
            if end is not None:
                frames.append(wire.encode_done(live.stream_id, live.request_id, wire.CANCELLED))
        else:
            first = streams.append(live.stream_id, chunks_json) if chunks_json else 0
            frames = [
                wire.encode_chunk(live.stream_id, live.request_id, first + i, chunk)
                for i, chunk in enumerate(chunks_json)
            ]
            if end is not None:
                self._chat_finish(row, end)
                frames.append(
                    wire.encode_done(live.stream_id, live.request_id, end.status, end.error)
                )
        for conn in self.get_connections():
            if conn.protocol_enabled and conn.id in live.subscribers:
                for data in frames:
                    conn.send(data)

    def _chat_finish(self, row: StreamRow, end: StreamEnd) -> None:
        """Rebuild the stream's message from its stored chunks, persist it, close the row."""
        messages, streams = self._chat_stores()
        builder = MessageBuilder(row.message_id)
        for _seq, chunk_json in streams.chunks(row.id):
            builder.apply(json.loads(chunk_json))
        message = builder.message
        if end.status != wire.COMPLETE:
            message.setdefault("metadata", {})["streamStatus"] = end.status
        if message["parts"]:
            messages.save(message)
        streams.end(row.id, end.status, end.error)
        streams.collect_garbage()

    def _chat_resume(self, conn: Connection) -> None:
        live = self._live()
        if live is None:
            self._recover_orphans()
            conn.send(wire.encode_resume_none())
            return
        conn.send(wire.encode_resuming(live.stream_id, live.request_id))
        for seq, chunk_json in self._chat_stores()[1].chunks(live.stream_id):
            conn.send(
                wire.encode_chunk(live.stream_id, live.request_id, seq, chunk_json, replay=True)
            )
        conn.send(wire.encode_replay_complete(live.stream_id, live.request_id))
        live.subscribers.add(conn.id)

    def _chat_clear(self) -> None:
        live = self._live()
        if live is not None:
            live.cancel()
        messages, streams = self._chat_stores()
        messages.clear()
        streams.clear()
        for conn in self.get_connections():
            if conn.protocol_enabled:
                conn.send(wire.encode_cleared())

    # -- helpers --------------------------------------------------------------------------------

    def _live(self) -> LiveStream | None:
        task = self._gw_host.running_task(_TASK)
        return LIVE.get(task) if task is not None else None

    def _send_to_others(self, sender: Connection, data: str) -> None:
        for conn in self.get_connections():
            if conn.protocol_enabled and conn is not sender:
                conn.send(data)

    def _chat_stores(self) -> tuple[MessageStore, StreamStore]:
        """The stores, created with their tables on first use after a wake; streams left
        "streaming" with no live task (a stop or crash cut them) are closed there."""
        stores = self.__dict__.get("_chat_message_store"), self.__dict__.get("_chat_stream_store")
        if stores[0] is not None and stores[1] is not None:
            return stores[0], stores[1]
        messages = MessageStore(self.sql, max_persisted=self.max_persisted_messages)
        streams = StreamStore(self.sql)
        messages.create_tables()
        streams.create_tables()
        self.__dict__["_chat_message_store"] = messages
        self.__dict__["_chat_stream_store"] = streams
        self._recover_orphans()
        return messages, streams

    def _recover_orphans(self) -> None:
        """Close streams left "streaming" with no live task (cut by a stop, a crash or a
        failed batch): their partial message is rebuilt from the stored chunks and kept."""
        if self._live() is not None:
            return
        streams = self._chat_stores()[1]
        for row in streams.streaming():
            self._chat_finish(row, StreamEnd(wire.INTERRUPTED))


def _as_chat(agent: Agent) -> ChatAgent:
    assert isinstance(agent, ChatAgent)
    return agent


def _message_list(frame: dict[str, Any]) -> list[Any]:
    messages = frame.get("messages")
    if not isinstance(messages, list):
        raise InvalidMessageError(f"{frame.get('type')} needs 'messages': a list of messages")
    return messages
