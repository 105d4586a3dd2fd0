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

    def append(self, stream_id: str, chunks_json: list[str], first: int | None = None) -> int:
        """Store chunks (already serialised) from seq `first` (default: after the stream's
        last); returns the first seq."""
        if first is None:
            first = int(
                self._sql(
                    "SELECT COALESCE(MAX(seq), -1) + 1 AS n FROM gw_chat_chunks "
                    "WHERE stream_id = ?",
                    stream_id,
                )[0]["n"]
            )
        for offset, chunk_json in enumerate(chunks_json):
            chunk_json = compact_chunk(chunk_json, MAX_CHUNK_BYTES)
            self._sql(
                "INSERT OR REPLACE INTO gw_chat_chunks (stream_id, seq, chunk) VALUES (?, ?, ?)",
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
    ids that get its live chunks (those open when it started, and those that resumed it).

    Two ways to store and send (`flush_s`):

    - `flush_s = 0` ("stored before sent"): each batch of chunks is stored and sent in one
      turn, released when it commits; a chunk a client saw is always on disk.
    - `flush_s > 0` ("sent, then stored within flush_s"): each chunk is sent at once (outside
      any turn) and kept in `pending` until a flush turn has stored it; flushes run at most
      every `flush_s` seconds (and at once after tool chunks), so a fast stream costs one
      commit per window, not one per chunk. A crash may lose the last `flush_s` of text a
      client already saw; resume stays exact (it replays the stored chunks, then `pending`).
    """

    def __init__(
        self, stream_id: str, request_id: str, subscribers: set[str], flush_s: float = 0.0
    ) -> None:
        self.stream_id = stream_id
        self.request_id = request_id
        self.subscribers = subscribers
        self.flush_s = flush_s
        self.answers_pending = False  # tool answers came while it streamed
        self.next_seq = 0  # flush_s > 0: the seq of the next chunk
        self.pending: list[tuple[int, str]] = []  # flush_s > 0: sent, not yet stored
        self._handed = 0  # flush_s > 0: chunks from this seq on are not in a flush yet
        self._wake = asyncio.Event()  # a chunk waits to be stored
        self._now = asyncio.Event()  # ... and should be stored without waiting
        self._inflight: asyncio.Future[Any] | None = None
        self._inflight_first = 0
        self._closing = False
        self._producer: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        """Stop generating now; the stream ends "cancelled" with what it has."""
        if self._producer is not None:
            self._producer.cancel()

    def replay_after(self, stored: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """`stored` (the chunks already in the database, in order) and then the chunks that
        were sent but are not stored yet: every chunk so far, once each."""
        last = stored[-1][0] if stored else -1
        return [*stored, *(item for item in self.pending if item[0] > last)]

    async def run(
        self,
        chunks: Callable[[], AsyncIterator[Chunk]],
        submit: Callable[[int | None, list[str], StreamEnd | None], asyncio.Future[Any]],
        max_batch_chunks: int | None = None,
        send_live: Callable[[int, str], None] | None = None,
    ) -> None:
        """Produce with `chunks()`; hand batches to `submit(first_seq, chunks_json, end)`,
        one turn each (`first_seq` None: stored before sent, the store numbers them)."""
        queue: asyncio.Queue[str | StreamEnd] = asyncio.Queue()
        self._producer = asyncio.create_task(self._produce(chunks, queue))
        windowed = self.flush_s > 0 and send_live is not None
        flusher: asyncio.Task[None] | None = None
        try:
            if windowed:
                assert send_live is not None
                flusher = asyncio.create_task(self._flush_every(submit))
                await self._send_then_store(queue, submit, send_live, flusher)
            else:
                await self._store_then_send(queue, submit, max_batch_chunks)
        except asyncio.CancelledError:
            self._producer.cancel()
            await asyncio.gather(self._producer, return_exceptions=True)
            if flusher is not None:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
            rest = [item for item in _drain(queue) if isinstance(item, str)]
            first: int | None = None
            if windowed:
                first, rest = self._unhanded(rest)
            try:
                await asyncio.shield(submit(first, rest, StreamEnd(wire.INTERRUPTED)))
            except Exception as err:  # the runtime no longer takes turns: on_start recovers it
                logger.info("chat: stream %s left to recovery: %s", self.stream_id, err)
            raise

    async def _store_then_send(
        self,
        queue: asyncio.Queue[str | StreamEnd],
        submit: Callable[[int | None, list[str], StreamEnd | None], asyncio.Future[Any]],
        max_batch_chunks: int | None,
    ) -> None:
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
            await asyncio.shield(submit(None, batch, end))

    async def _send_then_store(
        self,
        queue: asyncio.Queue[str | StreamEnd],
        submit: Callable[[int | None, list[str], StreamEnd | None], asyncio.Future[Any]],
        send_live: Callable[[int, str], None],
        flusher: asyncio.Task[None],
    ) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, StreamEnd):
                end = item
                break
            seq = self.next_seq
            self.next_seq += 1
            self.pending.append((seq, item))
            send_live(seq, item)
            self._wake.set()
            if _forces_flush(item):
                self._now.set()
        self._closing = True  # the flusher ends after the flush it may be doing
        self._wake.set()
        self._now.set()
        await asyncio.gather(flusher, return_exceptions=True)
        if self._inflight is not None:
            failed = await asyncio.gather(asyncio.shield(self._inflight), return_exceptions=True)
            if isinstance(failed[0], BaseException):
                self._handed = self._inflight_first  # store its chunks with the last batch
        first, rest = self._unhanded([])
        await asyncio.shield(submit(first, rest, end))

    async def _flush_every(
        self, submit: Callable[[int | None, list[str], StreamEnd | None], asyncio.Future[Any]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            # Wait out the window (or a chunk that must be stored at once). No wait_for:
            # on 3.11 it can swallow the cancellation that ends this task.
            timer = loop.call_later(self.flush_s, self._now.set)
            await self._now.wait()
            timer.cancel()
            self._now.clear()
            if self._closing:
                return
            first, batch = self._unhanded([])
            if not batch:
                continue
            last = first + len(batch) - 1
            self._inflight_first = first
            self._inflight = submit(first, batch, None)
            try:
                await asyncio.shield(self._inflight)
            except Exception as err:  # a failed flush: its chunks go with the next one
                logger.warning("chat: stream %s: storing chunks failed: %s", self.stream_id, err)
                self._handed = first
                self._wake.set()
                continue
            self.pending = [item for item in self.pending if item[0] > last]

    def _unhanded(self, extra: list[str]) -> tuple[int, list[str]]:
        """(first seq, chunks) not handed to a flush yet, plus `extra` (not sent) after them."""
        chunks = [chunk for seq, chunk in self.pending if seq >= self._handed]
        first = self._handed
        for chunk in extra:
            self.pending.append((self.next_seq, chunk))
            self.next_seq += 1
            chunks.append(chunk)
        self._handed = self.next_seq
        return first, chunks

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


_FLUSH_AT_ONCE = ('"type":"tool-', '"type":"error"')


def _forces_flush(chunk_json: str) -> bool:
    """Tool calls, results, approval requests and errors are stored without waiting."""
    return chunk_json.startswith(_FLUSH_AT_ONCE, 1)


def _drain(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


# The live stream of a running chat task (AgentHost.running_task), to reach its subscribers
# and cancel it from a turn. Keyed weakly by the task: it goes with the task.
LIVE: weakref.WeakKeyDictionary[asyncio.Task[Any], LiveStream] = weakref.WeakKeyDictionary()
