"""`ChatAgent`: an agent whose conversation lives in its own SQLite database.

    from gatewayd.chat import ChatAgent, OpenAICompatibleBackend

    class Assistant(ChatAgent):
        system_prompt = "You run the heating of this building."
        backend = OpenAICompatibleBackend(base_url="http://127.0.0.1:8000/v1", model="qwen")

Clients speak the `gw.chat.*` frames (protocols/PROTOCOL.md, "Chat"). A `gw.chat.send`
persists the conversation (store.py), then the answer is produced outside the turn, by a task
the runtime owns: the steps of the tool loop (toolloop.py: model call, tool calls, model call
...), its chunks sent at once and stored within `stream_flush_s`, or stored first and sent
(streams.py). When the stream ends, its message is rebuilt from the stored chunks and
persisted. A stream cut by a stop or a crash is closed on the next wake, its partial message
rebuilt from what was stored. Tool calls that wait (approval, client tools) stay in the stored
message; answers (approvals.py) are stored, applied, and the answer continues in a new stream.
Override `on_chat_message(messages, ctx)` to make one model call another way; call
`super().on_start()` if you override `on_start`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gatewayd.agents import Agent, Connection
from gatewayd.chat.approvals import (
    APPROVAL,
    CLIENT,
    Answer,
    AnswerStore,
    apply_answer,
    parse_answer,
    waiting_calls,
)
from gatewayd.chat.backends import ModelBackend
from gatewayd.chat.codemode import (
    answer_program_call,
    build_code_tool,
    end_cut_programs,
    missing_executor_tool,
    without_program_calls,
)
from gatewayd.chat.devices import DeviceTools
from gatewayd.chat.messages import Chunk, InvalidMessageError, Message, MessageBuilder
from gatewayd.chat.store import MessageStore
from gatewayd.chat.streams import LIVE, LiveStream, StreamEnd, StreamRow, StreamStore
from gatewayd.chat.toolloop import DEFAULT_MAX_STEPS, ToolSet, check_client_tools, run_steps
from gatewayd.tools import Tool, agent_tools
from protocols import chat as wire

logger = logging.getLogger(__name__)

_TASK = "chat-stream"
MAX_REQUEST_ID_CHARS = 128
_SETTINGS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS gw_chat_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
)
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class ChatContext:
    """What `on_chat_message` knows about the request besides the messages."""

    request_id: str
    stream_id: str
    connection_id: str | None  # None: a continuation the agent started by itself
    body: dict[str, Any] = field(default_factory=dict)  # the client's extra request fields
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-style specs offered


class ChatAgent(Agent):
    """See the module docstring. Class attributes configure it."""

    backend: ClassVar[ModelBackend | None] = None
    system_prompt: ClassVar[str | None] = None
    max_persisted_messages: ClassVar[int | None] = None
    # Model calls per answer at most (a tool loop stops there).
    max_steps: ClassVar[int] = DEFAULT_MAX_STEPS
    # Tools besides the agent's own `@tool` methods, and the devices it exposes as tools.
    tools: ClassVar[Sequence[Tool]] = ()
    devices: ClassVar[Sequence[DeviceTools]] = ()
    # How answers are stored (streams.LiveStream): > 0: each chunk is sent at once and stored
    # within this many seconds (one commit per window); 0: stored before it is sent.
    stream_flush_s: ClassVar[float] = 0.25
    # flush 0: chunks stored and sent per turn at most (None: all that arrived meanwhile).
    stream_batch_max_chunks: ClassVar[int | None] = None
    # Code Mode (codemode.py): the model gets one `code` tool whose programs use the server
    # tools, instead of those tools; programs run on `code_executor` (a CodeExecutor; the
    # daemon sets its own on code-mode classes).
    code_mode: ClassVar[bool] = False
    code_executor: ClassVar[Any] = None

    # -- what a subclass overrides ----------------------------------------------------------

    def on_chat_message(self, messages: list[Message], ctx: ChatContext) -> AsyncIterator[Chunk]:
        """One model call (one step of the answer): the chunks answering `messages` (full
        content, oldest first; the last one is the assistant message being built when the
        answer already has steps) as an async iterator, or an `async def` returning one.
        `ctx.tools` are the tools to offer. It runs outside any turn, in a task the runtime
        owns: `self.sql` and `set_state` are not available here (NotInTurnError)."""
        if self.backend is None:
            raise NotImplementedError(
                f"{type(self).__name__}: set `backend = ...` or override on_chat_message"
            )
        return self.backend.stream(messages, system=self.system_prompt, tools=ctx.tools or None)

    def chat_tools(self) -> list[Tool]:
        """The server tools of an answer: the agent's `@tool` methods (each call a turn of
        this agent), `tools`, and the tools of `devices`. Called in a turn."""
        host = self._gw_host
        own = [_in_turn(host, tool) for tool in agent_tools(self)]
        runtime = getattr(host, "runtime", None)
        device_tools = [t for device in self.devices for t in device.tools(runtime)]
        return [*own, *self.tools, *device_tools]

    def offered_tools(self) -> list[Tool]:
        """The server tools the model is offered: `chat_tools()`, or in Code Mode the one
        `code` tool whose programs may call them. Called in a turn."""
        tools = self.chat_tools()
        if not self.code_mode:
            return tools
        if self.code_executor is None:
            return [missing_executor_tool(type(self).__name__)]
        return [build_code_tool(self.code_executor, tools, self._gw_host)]

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
        self._apply_answers()

    def on_error(self, err: BaseException) -> Any:
        # A turn rolled back: the write cache may name rows that are gone, and tables created
        # in it are gone too. Start again from the database on the next use.
        for name in ("_chat_message_store", "_chat_stream_store", "_chat_answer_store"):
            self.__dict__.pop(name, None)
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
            elif frame_type in (wire.TOOL_APPROVAL, wire.TOOL_RESULT):
                kind = APPROVAL if frame_type == wire.TOOL_APPROVAL else CLIENT
                self._chat_answer(conn, parse_answer(kind, frame, request_id or uuid.uuid4().hex))
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
        client_tools = check_client_tools(frame.get("clientTools"))
        messages = self.persist_messages(_message_list(frame))
        self._send_to_others(conn, wire.encode_messages(self.messages))
        self._chat_setting("client_tools", client_tools)
        body = {
            k: v for k, v in frame.items() if k not in ("type", "id", "messages", "clientTools")
        }
        self._chat_setting("body", body)
        self._start_stream(request_id, conn.id, messages, None, body, client_tools)

    def _start_stream(
        self,
        request_id: str,
        connection_id: str | None,
        history: list[Message],
        continues: Message | None,
        body: dict[str, Any],
        client_tools: list[dict[str, Any]],
    ) -> None:
        """Start producing an answer to `history` (or continuing the stored message
        `continues`), outside this turn, in a task the runtime owns."""
        stream_id = uuid.uuid4().hex
        message_id = continues["id"] if continues is not None else f"msg_{uuid.uuid4().hex}"
        self._chat_stores()[1].begin(stream_id, request_id, message_id)
        toolset = ToolSet.of(self.offered_tools(), client_tools)
        ctx = ChatContext(request_id, stream_id, connection_id, body, toolset.specs())
        subscribers = {c.id for c in self.get_connections() if c.protocol_enabled}
        live = LiveStream(stream_id, request_id, subscribers, self.stream_flush_s)
        host = self._gw_host
        builder = MessageBuilder(message_id, continues)
        max_steps = self.max_steps

        def submit(first: int | None, chunks_json: list[str], end: StreamEnd | None) -> Any:
            return host.submit(
                lambda agent: _as_chat(agent)._chat_batch(live, first, chunks_json, end)
            )

        def send_live(seq: int, chunk_json: str) -> None:  # outside any turn: not gated
            frame = wire.encode_chunk(stream_id, request_id, seq, chunk_json)
            for conn in host.connections():
                if conn.protocol_enabled and conn.id in live.subscribers:
                    conn.send_now(frame)

        def answer() -> AsyncIterator[Chunk]:
            return run_steps(
                lambda messages: self.on_chat_message(without_program_calls(messages), ctx),
                history,
                builder,
                toolset,
                max_steps=max_steps,
            )

        # If this turn rolls back, the stream row goes with it and the first batch finds
        # no stream: see _chat_batch.
        task = host.start_task(
            _TASK, live.run(answer, submit, self.stream_batch_max_chunks, send_live)
        )
        task.add_done_callback(lambda _task: _after_stream(host, live))
        LIVE[task] = live

    def _chat_batch(
        self, live: LiveStream, first: int | None, chunks_json: list[str], end: StreamEnd | None
    ) -> None:
        """One turn of a live stream: store `chunks_json` (from seq `first`: they were sent
        already; None: send them after they are stored); at `end`, close the stream."""
        streams = self._chat_stores()[1]
        row = streams.get(live.stream_id)
        frames: list[str] = []
        if row is None or row.status != "streaming":
            # Its send was rolled back, or the chat was cleared: stop, store nothing, but
            # still end the stream for its clients (never leave one "streaming").
            live.cancel()
            if end is not None:
                frames.append(wire.encode_done(live.stream_id, live.request_id, wire.CANCELLED))
        else:
            stored_from = streams.append(live.stream_id, chunks_json, first) if chunks_json else 0
            if first is None:  # stored before sent
                frames = [
                    wire.encode_chunk(live.stream_id, live.request_id, stored_from + i, chunk)
                    for i, chunk in enumerate(chunks_json)
                ]
            if end is not None:
                message = self._chat_finish(row, end)
                frames.append(
                    wire.encode_done(
                        live.stream_id,
                        live.request_id,
                        end.status,
                        end.error,
                        waiting=waiting_calls(message),
                    )
                )
        for conn in self.get_connections():
            if conn.protocol_enabled and conn.id in live.subscribers:
                for data in frames:
                    conn.send(data)
        if end is not None and self._chat_stores()[2].all():
            live.answers_pending = True  # applied once the stream's task is over

    def _chat_finish(self, row: StreamRow, end: StreamEnd) -> Message:
        """Rebuild the stream's message from its stored chunks (onto the stored message it
        continues, if any), persist it, close the row."""
        messages, streams, _answers = self._chat_stores()
        builder = MessageBuilder(row.message_id, messages.get(row.message_id))
        for _seq, chunk_json in streams.chunks(row.id):
            builder.apply(json.loads(chunk_json))
        message = builder.message
        if end.status != wire.COMPLETE:
            message.setdefault("metadata", {})["streamStatus"] = end.status
            if self.code_mode:
                end_cut_programs(message, end.status)
        if message["parts"]:
            messages.save(message)
        streams.end(row.id, end.status, end.error)
        streams.collect_garbage()
        return message

    # -- tool answers -----------------------------------------------------------------------

    def _chat_answer(self, conn: Connection, answer: Answer) -> None:
        """Store a client's approval, denial or tool result, then apply it (at once, or when
        the streaming answer ends)."""
        if conn.readonly:
            conn.send(wire.encode_error("connection is read-only", answer.request_id))
            return
        if answer.kind == APPROVAL and answer_program_call(
            self._gw_host, answer.tool_call_id, answer.approved, answer.reason
        ):
            return  # a running program's call: it goes on (its chunks tell the clients)
        live = self._live()
        if live is None:
            problem = self._answer_problem(answer)
            if problem is not None:
                conn.send(wire.encode_error(problem, answer.request_id))
                return
        if not self._chat_stores()[2].add(answer):
            conn.send(
                wire.encode_error(
                    f"tool call {answer.tool_call_id!r} already has an answer", answer.request_id
                )
            )
            return
        if live is None:
            self._apply_answers()

    def _answer_problem(self, answer: Answer) -> str | None:
        last = self._last_assistant()
        if last is None:
            return f"no tool call {answer.tool_call_id!r}: the chat has no assistant message"
        return apply_answer(last, answer)  # on a copy: only to say what is wrong

    def _apply_answers(self) -> None:
        """Apply the stored answers to the last assistant message (when no answer streams);
        when none of its calls waits any more, continue the answer."""
        if self._live() is not None:
            return
        answers_store = self._chat_stores()[2]
        answers = answers_store.all()
        if not answers:
            return
        messages = self._chat_stores()[0]
        last = self._last_assistant()
        applied: Answer | None = None
        for answer in answers:
            answers_store.delete(answer.tool_call_id)
            problem = None if last is None else apply_answer(last, answer)
            if last is None or problem is not None:
                for conn in self.get_connections():
                    if conn.protocol_enabled:
                        conn.send(
                            wire.encode_error(problem or "no assistant message", answer.request_id)
                        )
                continue
            applied = answer
        if last is None or applied is None:
            return
        messages.save(last)
        for conn in self.get_connections():
            if conn.protocol_enabled:
                conn.send(wire.encode_message_updated(last))
        if waiting_calls(last):
            return
        history = messages.load()
        history = [m for m in history if m["id"] != last["id"]]
        self._start_stream(
            applied.request_id,
            None,
            history,
            last,
            self._chat_setting("body") or {},
            self._chat_setting("client_tools") or [],
        )

    def _last_assistant(self) -> Message | None:
        stored = self._chat_stores()[0].load_last()
        return stored if stored is not None and stored.get("role") == "assistant" else None

    def _chat_resume(self, conn: Connection) -> None:
        live = self._live()
        if live is None:
            self._recover_orphans()
            conn.send(wire.encode_resume_none())
            return
        # With a flush window the live chunks are sent past the output gate: the replay must
        # be too, or a live chunk could overtake it (it holds nothing uncommitted).
        send = conn.send_now if live.flush_s > 0 else conn.send
        send(wire.encode_resuming(live.stream_id, live.request_id))
        stored = self._chat_stores()[1].chunks(live.stream_id)
        for seq, chunk_json in live.replay_after(stored):
            send(wire.encode_chunk(live.stream_id, live.request_id, seq, chunk_json, replay=True))
        send(wire.encode_replay_complete(live.stream_id, live.request_id))
        live.subscribers.add(conn.id)

    def _chat_clear(self) -> None:
        live = self._live()
        if live is not None:
            live.cancel()
        messages, streams, answers = self._chat_stores()
        messages.clear()
        streams.clear()
        answers.clear()
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

    def _chat_stores(self) -> tuple[MessageStore, StreamStore, AnswerStore]:
        """The stores, created with their tables on first use after a wake; streams left
        "streaming" with no live task (a stop or crash cut them) are closed there."""
        found = self.__dict__.get("_chat_answer_store")
        if found is not None:
            return (
                self.__dict__["_chat_message_store"],
                self.__dict__["_chat_stream_store"],
                found,
            )
        messages = MessageStore(self.sql, max_persisted=self.max_persisted_messages)
        streams = StreamStore(self.sql)
        answers = AnswerStore(self.sql)
        messages.create_tables()
        streams.create_tables()
        answers.create_tables()
        self.sql(_SETTINGS_SCHEMA)
        self.__dict__["_chat_message_store"] = messages
        self.__dict__["_chat_stream_store"] = streams
        self.__dict__["_chat_answer_store"] = answers
        self._recover_orphans()
        return messages, streams, answers

    def _chat_setting(self, key: str, value: Any = _UNSET) -> Any:
        """Read (or, given `value`, write) one of the chat's settings kept for continuations:
        the last request's extra fields and client tools."""
        self._chat_stores()
        if value is _UNSET:
            rows = self.sql("SELECT value FROM gw_chat_settings WHERE key = ?", key)
            return json.loads(rows[0]["value"]) if rows else None
        self.sql(
            "INSERT INTO gw_chat_settings (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            key,
            json.dumps(value, separators=(",", ":"), ensure_ascii=False),
        )
        return value

    def _recover_orphans(self) -> None:
        """Close streams left "streaming" with no live task (cut by a stop, a crash or a
        failed batch): their partial message is rebuilt from the stored chunks and kept."""
        if self._live() is not None:
            return
        streams = self._chat_stores()[1]
        for row in streams.streaming():
            self._chat_finish(row, StreamEnd(wire.INTERRUPTED))


def _in_turn(host: Any, tool: Tool) -> Tool:
    """`tool` (a bound `@tool` method of the agent) run as a turn of the agent, so it may use
    `self.sql` and `set_state` (a chat's tools run outside turns, in its stream task)."""
    method_name = tool.fn.__name__

    def call(**args: Any) -> Any:
        return host.submit(lambda agent: getattr(agent, method_name)(**args))

    return dataclasses.replace(tool, fn=call)


def _after_stream(host: Any, live: LiveStream) -> None:
    """Answers that came while `live` streamed are applied once its task is over (then a
    continuation may start: one stream task at a time)."""
    if not live.answers_pending:
        return
    try:
        future = host.submit(lambda agent: _as_chat(agent)._apply_answers())
    except Exception as err:  # the runtime is stopping: the next wake applies them
        logger.info("chat: stored tool answers left for the next wake: %s", err)
        return
    future.add_done_callback(_log_failure)


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("chat: applying tool answers failed: %s", future.exception())


def _as_chat(agent: Agent) -> ChatAgent:
    assert isinstance(agent, ChatAgent)
    return agent


def _message_list(frame: dict[str, Any]) -> list[Any]:
    messages = frame.get("messages")
    if not isinstance(messages, list):
        raise InvalidMessageError(f"{frame.get('type')} needs 'messages': a list of messages")
    return messages
