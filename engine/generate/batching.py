"""Continuous batching on one worker thread: every step advances every admitted sequence.

The scheduler loop, on its own thread (it owns the ONNX Runtime session), runs steps:
1. takes new requests; ends cancelled ones (their KV blocks are freed at once) and those past
   their deadline;
2. admits waiting sequences, highest priority first then oldest, while fewer than
   `max_batch` are admitted and the KV blocks of their whole prompt can be reserved; each
   takes the cached blocks of its prompt's longest known prefix. A waiting sequence of higher
   priority preempts the lowest-priority admitted one when it does not fit. A sequence that
   shares a prompt prefix with one still prefilling waits for that prefix to be cached
   instead of computing it again;
3. **chunked prefill**: one decoder call computes up to `prefill_tokens` prompt tokens of the
   prefilling sequences, oldest first, packed into one row (each sequence's tokens attend to
   its own blocks and, causally, its own new tokens; no padding); a sequence whose prompt is
   complete samples its first token and starts decoding. A long prompt thus costs each step
   one chunk, never a stall of everyone's decode;
4. makes room: if the decoding sequences need more blocks than are available, the
   lowest-priority, most recently admitted ones are preempted (blocks freed, back to the
   queue, recomputed later from prompt + generated tokens with their sampler state, so no
   token changes);
5. runs one decode call for every decoding sequence (one new token each, a row each; the
   graph gathers each row's blocks from the pool), samples each row, hands out text, retires
   finished sequences.

Sequences join and leave between any two steps. KV memory: `engine.generate.kv_pool`; the
decoder graph's I/O: `engine.generate.onnx_export`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.generate.decoder_io import MASKED, pool_key, pool_value
from engine.generate.errors import GenerateError
from engine.generate.gguf_model import LlamaConfig
from engine.generate.json_constraint import JsonPrefix, choose_token
from engine.generate.kv_pool import BlockPool, BlockTable
from engine.generate.sampling import SamplingParams, sample

F32 = NDArray[np.float32]
log = logging.getLogger("engine.generate")
BATCH_SIZE_HISTORY = 4096
LATENCY_HISTORY = 4096  # recent TTFT / inter-token samples kept for stats() percentiles
RunDecoder = Callable[[dict[str, NDArray[Any]]], dict[str, F32]]
FINISH_REASONS = ("stop", "length", "cancelled", "deadline")


@dataclass(frozen=True)
class Usage:
    """Token counts of one request: the prompt as computed, the answer's tokens."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """A piece of the answer: new text, the token ids it came from, and on the last one why
    generation stopped (`"stop"`: a stop token or string; `"length"`: max_tokens or context;
    `"cancelled"`; `"deadline"`: the request's deadline passed) and the token `usage`."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Request:
    """One generation, as the scheduler receives it. `emit` must be thread-safe; it gets
    Deltas, then an exception or nothing, then None (the end). Higher `priority` is admitted
    first and preempted last; `deadline` is a `time.monotonic()` instant; `json_mode` keeps
    the answer a JSON object or array and ends it when the value is complete."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    emit: Callable[[Delta | BaseException | None], None]
    stop_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    deadline: float | None = None
    json_mode: bool = False
    ignore_eos: bool = False  # the model's own stop tokens do not end it (benchmarks)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still start one of `stops`."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class Latencies:
    """Recent time-to-first-token and inter-token samples (seconds), bounded."""

    def __init__(self) -> None:
        self.ttft: deque[float] = deque(maxlen=LATENCY_HISTORY)
        self.inter_token: deque[float] = deque(maxlen=LATENCY_HISTORY)


class SequenceState:
    """A request in the scheduler: its block table, sampler state and the text handed out."""

    def __init__(
        self,
        request: Request,
        config: LlamaConfig,
        stop_ids: frozenset[int],
        decode: Any,
        pool: BlockPool,
        latencies: Latencies | None = None,
        order: int = 0,
        token_text: Callable[[int], str] | None = None,
    ) -> None:
        self.request = request
        self.order = order  # arrival: ties of priority go oldest first
        self._stop_ids = (frozenset() if request.ignore_eos else stop_ids) | request.stop_token_ids
        self._decode = decode
        self._latencies = latencies or Latencies()
        self.rng = np.random.default_rng(request.seed)
        prompt = len(request.prompt_ids)
        self.limit = min(prompt + request.max_tokens, config.context_length)
        self.cache = BlockTable(pool)
        self.generated: list[int] = []
        self.prompt_array = np.asarray(request.prompt_ids, np.int64)
        self.seen: NDArray[np.bool_] | None = None
        if request.sampling.repetition_penalty != 1.0:
            self.seen = np.zeros(config.vocab_size, np.bool_)
            self.seen[self.prompt_array[self.prompt_array < config.vocab_size]] = True
        self._pending: list[int] = []  # token ids not yet handed out with text
        self._emitted = 0  # characters of the decoded text already handed out
        self._stable = ""  # decoded text of generated[: self._stable_tokens], final
        self._stable_tokens = 0
        self._last_token_at: float | None = None
        self._prefill: list[int] = []  # what the current admission must compute
        self._token_text = token_text or (lambda token: str(decode([token])))
        self.json: JsonPrefix | None = JsonPrefix() if request.json_mode else None

    @property
    def priority(self) -> int:
        return self.request.priority

    def queue_key(self) -> tuple[int, int]:
        return (-self.request.priority, self.order)

    def _text(self) -> str:
        """The decoded answer so far. Only the tokens after the last clean character boundary
        are decoded again, so a long answer costs O(n), not O(n^2)."""
        tail = self._decode(self.generated[self._stable_tokens :])
        if tail.endswith("\ufffd"):  # an incomplete UTF-8 sequence: not a boundary yet
            return self._stable + tail
        self._stable += tail
        self._stable_tokens = len(self.generated)
        return self._stable

    def tokens_to_prefill(self) -> list[int]:
        """The prompt, plus what was generated before a preemption (recomputed, not stored)."""
        return self.request.prompt_ids + self.generated

    def start_prefill(self) -> None:
        self._prefill = self.tokens_to_prefill()

    def prefill_remaining(self) -> int:
        return len(self._prefill) - self.cache.length

    def next_chunk(self, budget: int) -> list[int]:
        start = self.cache.length
        return self._prefill[start : start + budget]

    def accept(self, logits: F32) -> bool:
        """Sample the next token from `logits`, hand out text; True when finished."""
        request = self.request
        json_done = False
        if self.json is None:
            token = sample(logits, request.sampling, self.rng, self.seen)
        else:
            chosen = choose_token(
                logits,
                lambda row: sample(row, request.sampling, self.rng, self.seen),
                self.json,
                self._token_text,
            )
            if chosen is None:  # no token continues the document: end here
                self._finish(self._text(), "stop")
                return True
            token, self.json = chosen
            json_done = self.json.complete
        now = time.monotonic()
        if self._last_token_at is None:
            self._latencies.ttft.append(now - request.submitted)
        else:
            self._latencies.inter_token.append(now - self._last_token_at)
        self._last_token_at = now
        if token in self._stop_ids:
            self._finish(self._text(), "stop")
            return True
        self.generated.append(token)
        if self.seen is not None and token < self.seen.size:
            self.seen[token] = True
        self._pending.append(token)
        text = self._text()
        cut = min((i for s in request.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._finish(text[:cut], "stop")
            return True
        if json_done:
            self._finish(text, "stop")
            return True
        if len(self.generated) >= request.max_tokens or self.cache.length + 1 >= self.limit:
            self._finish(text, "length")
            return True
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for more
            ready = len(text) - _held_back(text, request.stop)
            if ready > self._emitted:
                request.emit(Delta(text[self._emitted : ready], tuple(self._pending)))
                self._emitted, self._pending = ready, []
        return False

    def end(self, reason: str) -> None:
        """Finish now (cancelled, deadline) with whatever was generated."""
        self._finish(self._text() if self.generated else "", reason)

    def _finish(self, text: str, reason: str) -> None:
        self.cache.free()  # before the caller hears of the end: its memory is back already
        usage = Usage(len(self.request.prompt_ids), len(self.generated))
        self.request.emit(Delta(text[self._emitted :], tuple(self._pending), reason, usage))
        self.request.emit(None)


def _common_prefix(a: NDArray[np.int64], b: NDArray[np.int64]) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class Scheduler:
    """Owns the decoder on one thread and batches every admitted sequence into each step."""

    def __init__(
        self,
        run_decoder: RunDecoder,
        config: LlamaConfig,
        stop_token_ids: frozenset[int],
        decode: Callable[[list[int]], str],
        *,
        max_batch: int = 16,
        prefill_tokens: int = 256,
        kv_cache_tokens: int = 8192,
        block_size: int = 16,
        prefix_cache: bool = True,
        name: str = "generate",
        prefill_rows: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.pool = BlockPool(config, -(-kv_cache_tokens // block_size) + 1, block_size)
        self.prefix_cache = prefix_cache
        self.prefill_rows = max(1, prefill_rows)  # packed prefill rows (one per replica)
        self._run_decoder = run_decoder
        self._config = config
        self._stop_ids = stop_token_ids
        self._decode = decode
        self._inbox: queue.SimpleQueue[SequenceState | None] = queue.SimpleQueue()
        self._waiting: list[SequenceState] = []  # sorted by queue_key
        self._prefilling: list[SequenceState] = []  # in admission order
        self._running: list[SequenceState] = []  # decoding, in admission order
        self._closed = False
        self._arrivals = itertools.count()
        self._token_texts: dict[int, str] = {}
        self.latencies = Latencies()
        # decode batch size of the latest steps (bounded: the scheduler runs for months)
        self.batch_sizes: deque[int] = deque(maxlen=BATCH_SIZE_HISTORY)
        self.decode_steps = 0
        self.prefill_steps = 0
        self.preemptions = 0
        self.prefill_tokens_total = 0  # prompt tokens computed (cached prefixes excluded)
        self.decode_tokens_total = 0  # tokens computed by decode calls
        # (admitted, waiting, blocks available) after the latest step, for stats()
        self.counts = (0, 0, self.pool.available_blocks)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue `request`. Raises `GenerateError` once closed (or if the loop died), or if
        the request could not fit the KV pool even alone."""
        if self._closed or not self._thread.is_alive():
            raise GenerateError("the generator is closed")
        state = SequenceState(
            request,
            self._config,
            self._stop_ids,
            self._decode,
            self.pool,
            self.latencies,
            next(self._arrivals),
            self.token_text,
        )
        needed = self.pool.blocks_for(state.limit)
        if needed > self.pool.usable_blocks:
            raise GenerateError(
                f"the request needs up to {state.limit} tokens of KV cache; the pool holds "
                f"{self.pool.usable_blocks * self.pool.block_size}: lower max_tokens or raise "
                "kv_cache_tokens"
            )
        self._inbox.put(state)

    def token_text(self, token: int) -> str:
        """The text of one token alone (cached; JSON mode tries many per step)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self._decode([token])
        return text

    def close(self) -> None:
        """Finish every request already submitted, then stop the thread."""
        self._closed = True
        self._inbox.put(None)
        self._thread.join()

    # -- the loop --------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._loop()
            while True:  # a request that raced close(): refuse it rather than leave it waiting
                try:
                    late = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if late is not None:
                    late.request.emit(GenerateError("the generator is closed"))
                    late.request.emit(None)
        except BaseException as exc:  # a bug in the loop itself: nobody may wait forever
            log.exception("the generation scheduler stopped")
            for seq in [*self._waiting, *self._prefilling, *self._running]:
                seq.request.emit(GenerateError(f"the generation scheduler stopped: {exc!r}"))
                seq.request.emit(None)
            self._waiting.clear()
            self._prefilling.clear()
            self._running.clear()
            raise

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def _loop(self) -> None:
        closing = False
        while not closing or self._busy():
            idle = not self._busy()
            try:
                item = self._inbox.get(block=idle and not closing)
            except queue.Empty:
                item = None
            else:
                if item is None:
                    closing = True
                else:
                    self._enqueue(item)
                    continue  # take every queued request before running a step
            self._end_cancelled_and_late()
            self._admit()
            if self._prefilling:
                self._prefill_step()
            if self._running:
                self._decode_step()
            self.counts = (
                len(self._prefilling) + len(self._running),
                len(self._waiting),
                self.pool.available_blocks,
            )

    def _enqueue(self, seq: SequenceState) -> None:
        bisect.insort(self._waiting, seq, key=SequenceState.queue_key)

    def _end_cancelled_and_late(self) -> None:
        now = time.monotonic()
        for group in (self._waiting, self._prefilling, self._running):
            for seq in list(group):
                request = seq.request
                if request.cancelled.is_set():
                    reason = "cancelled"
                elif request.deadline is not None and now >= request.deadline:
                    reason = "deadline"
                else:
                    continue
                group.remove(seq)
                seq.end(reason)

    # -- admission and preemption ----------------------------------------------------------

    def _admitted(self) -> list[SequenceState]:
        return [*self._prefilling, *self._running]

    def _victim(self) -> SequenceState | None:
        """The admitted sequence to preempt first: lowest priority, then latest admitted."""
        admitted = self._admitted()
        if not admitted:
            return None
        return min(admitted, key=lambda s: (s.priority, -s.order))

    def _preempt(self, victim: SequenceState) -> None:
        if victim in self._running:
            self._running.remove(victim)
        else:
            self._prefilling.remove(victim)
        victim.cache.free()
        self._enqueue(victim)
        self.preemptions += 1

    def _waits_for_a_shared_prefix(self, seq: SequenceState) -> bool:
        """Whether a sequence still prefilling will soon cache more of `seq`'s prompt than
        the cache holds now (admitting `seq` now would compute that prefix twice)."""
        if not self.prefix_cache or not self._prefilling:
            return False
        size = self.pool.block_size
        cached = self.pool.cached_tokens(seq.request.prompt_ids)
        for other in self._prefilling:
            shared = _common_prefix(seq.prompt_array, other.prompt_array)
            if min(shared, len(seq.request.prompt_ids) - 1) // size * size > cached:
                return True
        return False

    def _admit(self) -> None:
        while self._waiting:
            seq = self._waiting[0]
            prompt = seq.tokens_to_prefill()
            headroom = sum(s.cache.blocks_needed(1) for s in self._running)
            need = self.pool.blocks_for(len(prompt)) + headroom
            fits = need <= self.pool.available_blocks
            if len(self._admitted()) >= self.max_batch or not fits:
                victim = self._victim()
                if victim is not None and victim.priority < seq.priority:
                    self._preempt(victim)
                    continue
                return
            if self._waits_for_a_shared_prefix(seq):
                return
            self._waiting.pop(0)
            if self.prefix_cache:
                seq.cache.share_prefix(prompt)
            seq.cache.reserve(len(prompt))
            seq.start_prefill()
            self._prefilling.append(seq)

    def _make_room(self) -> None:
        """Free blocks for one more token of every decoding sequence, preempting the
        lowest-priority, most recently admitted ones."""
        while (
            sum(s.cache.blocks_needed(1) for s in self._running) > self.pool.available_blocks
            and len(self._admitted()) > 1
        ):
            victim = self._victim()
            assert victim is not None
            self._preempt(victim)

    # -- steps -----------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        budget = self.prefill_tokens
        batch: list[SequenceState] = []
        chunks: list[list[int]] = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            chunk = seq.next_chunk(budget)
            batch.append(seq)
            chunks.append(chunk)
            budget -= len(chunk)
        self.prefill_steps += 1
        self.prefill_tokens_total += sum(len(c) for c in chunks)
        try:
            logits = self._run_packed(batch, chunks)
            for seq in batch:
                if self.prefix_cache:
                    prompt = seq.request.prompt_ids
                    self.pool.remember(prompt[: seq.cache.length], seq.cache.blocks)
                if seq.prefill_remaining() > 0:
                    continue
                self._prefilling.remove(seq)
                if not seq.accept(logits[batch.index(seq)]):
                    self._running.append(seq)
        except Exception as exc:
            self._fail(batch, exc)

    def _decode_step(self) -> None:
        self._make_room()
        batch = list(self._running)
        if not batch:
            return
        self.batch_sizes.append(len(batch))
        self.decode_steps += 1
        self.decode_tokens_total += len(batch)
        try:
            logits = self._run(batch, [[s.generated[-1]] for s in batch])
            finished = {id(s) for s, row in zip(batch, logits, strict=True) if s.accept(row)}
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._running = [s for s in self._running if id(s) not in finished]

    def _fail(self, batch: list[SequenceState], exc: Exception) -> None:
        log.exception("generation step failed for %d sequence(s)", len(batch), exc_info=exc)
        for seq in batch:
            for group in (self._running, self._prefilling):
                if seq in group:
                    group.remove(seq)
            seq.cache.free()
            seq.request.emit(GenerateError(f"generation failed: {exc}"))
            seq.request.emit(None)

    # -- decoder calls ---------------------------------------------------------------------

    def _run(self, batch: list[SequenceState], tokens: list[list[int]]) -> F32:
        """One decoder call, a row per sequence: `tokens[r]` follow row r's cache; the last
        real token's logits of each row, [rows, vocab]."""
        return self._call([[(s, t)] for s, t in zip(batch, tokens, strict=True)])

    def _run_packed(self, batch: list[SequenceState], tokens: list[list[int]]) -> F32:
        """One decoder call, the sequences' tokens packed into `prefill_rows` rows balanced by
        token count (one row: no padding at all); [sequences, vocab] in `batch` order."""
        n_rows = min(self.prefill_rows, len(batch))
        rows: list[list[tuple[SequenceState, list[int]]]] = [[] for _ in range(n_rows)]
        loads = [0] * n_rows
        placed: list[tuple[int, int]] = [(0, 0)] * len(batch)  # (row, place in row)
        for i in sorted(range(len(batch)), key=lambda i: -len(tokens[i])):
            r = loads.index(min(loads))
            placed[i] = (r, len(rows[r]))
            rows[r].append((batch[i], tokens[i]))
            loads[r] += len(tokens[i])
        logits = self._call(rows)
        starts = np.cumsum([0] + [len(row) for row in rows])
        return logits[[starts[r] + j for r, j in placed]]

    def _call(self, rows: list[list[tuple[SequenceState, list[int]]]]) -> F32:
        """Run the decoder over `rows`, each a list of (sequence, new tokens) sharing one
        batch row: a token attends to its own sequence's cached tokens (its blocks, gathered
        by the graph) and, causally, its own sequence's new tokens. Stores the new K/V in the
        sequences' blocks; returns the logits of each sequence's last new token, in order."""
        size = self.pool.block_size
        # Each row's table lists the blocks its sequences read, each block once: sequences
        # sharing a cached prefix (a system prompt) share its columns, so packing them costs
        # the attention of one copy of the prefix, not one per sequence.
        tables: list[dict[int, int]] = []
        for row in rows:
            columns: dict[int, int] = {}
            for seq, _ in row:
                for block in seq.cache.blocks[: -(-seq.cache.length // size)]:
                    columns.setdefault(block, len(columns))
            tables.append(columns)
        width = max(1, max(len(columns) for columns in tables))
        seq_len = max(sum(len(t) for _, t in row) for row in rows)
        past = width * size
        n_rows, per_row = len(rows), max(len(row) for row in rows)
        ids = np.zeros((n_rows, seq_len), np.int64)
        positions = np.zeros((n_rows, seq_len), np.int64)
        table = np.zeros((n_rows, width), np.int64)
        bias = np.full((n_rows, seq_len, past + seq_len), MASKED, np.float32)
        logits_index = np.zeros((n_rows, per_row), np.int64)
        offsets = np.arange(size)
        store_rows, store_cols, store_slots = [], [], []
        for r, (row, columns) in enumerate(zip(rows, tables, strict=True)):
            table[r, : len(columns)] = list(columns)
            start = 0
            for j, (seq, new) in enumerate(row):
                cache, n = seq.cache, len(new)
                length, stop = cache.length, start + n
                if length:
                    used = [columns[b] for b in cache.blocks[: -(-length // size)]]
                    visible = (np.asarray(used)[:, None] * size + offsets).ravel()[:length]
                    bias[r, start:stop, visible] = 0.0
                bias[r, start:stop, past + start : past + stop] = np.triu(
                    np.full((n, n), MASKED, np.float32), k=1
                )
                ids[r, start:stop] = new
                positions[r, start:stop] = np.arange(length, length + n)
                logits_index[r, j] = stop - 1
                cache.reserve(length + n)
                store_rows.append(np.full(n, r))
                store_cols.append(np.arange(start, stop))
                store_slots.append(cache.slots(length, length + n))
                start = stop
        feeds: dict[str, NDArray[Any]] = {
            "input_ids": ids,
            "position_ids": positions,
            "attention_bias": bias,
            "logits_index": logits_index,
            "block_table": table,
        }
        for i in range(self._config.n_layers):
            feeds[pool_key(i)] = self.pool.keys[i]
            feeds[pool_value(i)] = self.pool.values[i]
        outputs = self._run_decoder(feeds)
        self.pool.write(
            outputs,
            np.concatenate(store_rows),
            np.concatenate(store_cols),
            np.concatenate(store_slots),
        )
        for row in rows:
            for seq, new in row:
                seq.cache.length += len(new)
        logits = outputs["logits"]
        return np.concatenate([logits[r, : len(row)] for r, row in enumerate(rows)])
