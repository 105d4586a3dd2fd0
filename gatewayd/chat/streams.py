"""Resumable streams: every chunk of an answer stored as it goes, and the live stream's driver.

`StreamStore` (SQL, inside turns): one row per stream (`gw_chat_streams`: status
"streaming" until it ends with a `protocols.chat` status) and one per chunk
(`gw_chat_chunks`, keyed `(stream_id, seq)`). Finished streams are deleted after
`FINISHED_STREAM_TTL_S`.

`LiveStream` (outside turns): drives one answer. A producer task reads the model's chunks
into a queue as fast as they come; the driver takes everything queued so far and hands it to
the agent as ONE turn (`AgentHost.submit`), which stores the chunks and sends them to the
stream's subscribers, released when that turn commits. While one such turn is in flight the
next chunks pile up, so writes batch themselves under load (one commit per batch, not per
chunk) and add one commit of latency when idle. Because chunk turns are turns of the agent,
a resume request is a turn between two of them: the replay it sends ends exactly where the
next live batch starts, so a resuming client gets every chunk once, in order, with no ACK.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from gatewayd.chat.guard import compact_chunk
from gatewayd.chat.messages import Chunk, check_chunk
from protocols import chat as wire

logger = logging.getLogger(__name__)

Sql = Callable[..., list[dict[str, Any]]]

FINISHED_STREAM_TTL_S = 24 * 3600.0
MAX_CHUNK_BYTES = 1_800_000  # a bigger chunk is streamed live in full, stored compacted

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS gw_chat_streams ("
    " id TEXT PRIMARY KEY, request_id TEXT NOT NULL, message_id TEXT NOT NULL,"
    " status TEXT NOT NULL, error TEXT, started_at REAL NOT NULL, ended_at REAL)",
    "CREATE TABLE IF NOT EXISTS gw_chat_chunks ("
    " stream_id TEXT NOT NULL, seq INTEGER NOT NULL, chunk TEXT NOT NULL,"
    " PRIMARY KEY (stream_id, seq)) WITHOUT ROWID",
)


@dataclass(frozen=True, slots=True)
class StreamRow:
    id: str
    request_id: str
    message_id: str
    status: str


class StreamStore:
    def __init__(self, sql: Sql) -> None:
        self._sql = sql

    def create_tables(self) -> None:
        for statement in SCHEMA:
            self._sql(statement)

    def begin(self, stream_id: str, request_id: str, message_id: str) -> None:
        self._sql(
            "INSERT INTO gw_chat_streams (id, request_id, message_id, status, started_at) "
            "VALUES (?, ?, ?, 'streaming', ?)",
            stream_id,
            request_id,
            message_id,
            time.time(),
        )

    def get(self, stream_id: str) -> StreamRow | None:
        rows = self._sql(
            "SELECT id, request_id, message_id, status FROM gw_chat_streams WHERE id = ?",
            stream_id,
        )
        return StreamRow(**rows[0]) if rows else None

    def streaming(self) -> list[StreamRow]:
        return [
            StreamRow(**row)
            for row in self._sql(
                "SELECT id, request_id, message_id, status FROM gw_chat_streams "
                "WHERE status = 'streaming' ORDER BY started_at"
            )
        ]

    def append(self, stream_id: str, chunks_json: list[str]) -> int:
        """Store chunks (already serialised) after the stream's last; returns the first seq."""
        first = int(
            self._sql(
                "SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM gw_chat_chunks WHERE stream_id = ?",
                stream_id,
            )[0]["n"]
        )
        for offset, chunk_json in enumerate(chunks_json):
            chunk_json = compact_chunk(chunk_json, MAX_CHUNK_BYTES)
            self._sql(
                "INSERT INTO gw_chat_chunks (stream_id, seq, chunk) VALUES (?, ?, ?)",
                stream_id,
                first + offset,
                chunk_json,
            )
        return first

    def chunks(self, stream_id: str) -> list[tuple[int, str]]:
        return [
            (row["seq"], row["chunk"])
            for row in self._sql(
                "SELECT seq, chunk FROM gw_chat_chunks WHERE stream_id = ? ORDER BY seq",
                stream_id,
            )
        ]

    def end(self, stream_id: str, status: str, error: str | None = None) -> None:
        self._sql(
            "UPDATE gw_chat_streams SET status = ?, error = ?, ended_at = ? WHERE id = ?",
            status,
            error,
            time.time(),
            stream_id,
        )

    def collect_garbage(self, now_s: float | None = None) -> None:
        cutoff = (time.time() if now_s is None else now_s) - FINISHED_STREAM_TTL_S
        old = "SELECT id FROM gw_chat_streams WHERE status != 'streaming' AND ended_at < ?"
        self._sql(f"DELETE FROM gw_chat_chunks WHERE stream_id IN ({old})", cutoff)
        self._sql(f"DELETE FROM gw_chat_streams WHERE id IN ({old})", cutoff)

    def clear(self) -> None:
        self._sql("DELETE FROM gw_chat_chunks")
        self._sql("DELETE FROM gw_chat_streams")


@dataclass(frozen=True, slots=True)
class StreamEnd:
    status: str
    error: str | None = None


class LiveStream:
    """One answer being produced (see the module docstring). `subscribers`: the connection
    ids that get its live chunks (those open when it started, and those that resumed it)."""

    def __init__(self, stream_id: str, request_id: str, subscribers: set[str]) -> None:
        self.stream_id = stream_id
        self.request_id = request_id
        self.subscribers = subscribers
        self.answers_pending = False  # tool answers came while it streamed
        self._producer: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        """Stop generating now; the stream ends "cancelled" with what it has."""
        if self._producer is not None:
            self._producer.cancel()

    async def run(
        self,
        chunks: Callable[[], AsyncIterator[Chunk]],
        submit: Callable[[list[str], StreamEnd | None], asyncio.Future[Any]],
        max_batch_chunks: int | None = None,
    ) -> None:
        """Produce with `chunks()`; hand each batch (at most `max_batch_chunks` chunks) to
        `submit(chunks_json, end)`, one turn each."""
        queue: asyncio.Queue[str | StreamEnd] = asyncio.Queue()
        self._producer = asyncio.create_task(self._produce(chunks, queue))
        try:
            end: StreamEnd | None = None
            while end is None:
                batch: list[str] = []
                item = await queue.get()
                while True:
                    if isinstance(item, StreamEnd):
                        end = item
                        break
                    batch.append(item)
                    if queue.empty() or len(batch) == max_batch_chunks:
                        break
                    item = queue.get_nowait()
                # Shielded: a batch handed to the agent is stored and sent even if this
                # driver is cancelled meanwhile (the runtime stopping).
                await asyncio.shield(submit(batch, end))
        except asyncio.CancelledError:
            self._producer.cancel()
            await asyncio.gather(self._producer, return_exceptions=True)
            rest = [item for item in _drain(queue) if isinstance(item, str)]
            try:
                await asyncio.shield(submit(rest, StreamEnd(wire.INTERRUPTED)))
            except Exception as err:  # the runtime no longer takes turns: on_start recovers it
                logger.info("chat: stream %s left to recovery: %s", self.stream_id, err)
            raise

    async def _produce(
        self, chunks: Callable[[], AsyncIterator[Chunk]], queue: asyncio.Queue[str | StreamEnd]
    ) -> None:
        try:
            stream = chunks()
            if inspect.isawaitable(stream):  # an `async def` returning the iterator
                stream = await stream
            async for chunk in stream:
                queue.put_nowait(json.dumps(check_chunk(chunk), separators=(",", ":")))
        except asyncio.CancelledError:
            queue.put_nowait(StreamEnd(wire.CANCELLED))
            return
        except Exception as err:
            logger.warning(
                "chat: stream %s failed: %s: %s", self.stream_id, type(err).__name__, err
            )
            message = f"{type(err).__name__}: {err}"
            queue.put_nowait(json.dumps({"type": "error", "errorText": message}))
            queue.put_nowait(StreamEnd(wire.FAILED, message))
            return
        queue.put_nowait(StreamEnd(wire.COMPLETE))


def _drain(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


# The live stream of a running chat task (AgentHost.running_task), to reach its subscribers
# and cancel it from a turn. Keyed weakly by the task: it goes with the task.
LIVE: weakref.WeakKeyDictionary[asyncio.Task[Any], LiveStream] = weakref.WeakKeyDictionary()
