"""Continuous batching on one worker thread: every decoder call advances all running sequences.

The scheduler loop, on its own thread (it owns the ONNX Runtime session):
1. takes new requests; drops cancelled ones (their KV blocks are freed at once);
2. admits waiting sequences, oldest first, while fewer than `max_batch` run, their KV blocks
   are available and the tokens they must compute fit `prefill_tokens` (the first one needs
   only a row and blocks): each takes the cached blocks of its prompt's longest known prefix,
   the rest of the prompts are prefilled together in one call (padded, masked) and each
   one's first token sampled. Chunked prefill mixed into decode steps is next: today a step
   with prompts delays the running sequences by that prefill;
3. makes room: if the running sequences need more blocks than are available, the most
   recently admitted are preempted (blocks freed, back to the front of the queue, recomputed
   later from prompt + generated tokens with their sampler state, so no token changes);
4. runs one decode call for every running sequence (one new token each, pasts gathered from
   the block pool and padded to the longest), samples each row, hands out text, retires
   finished sequences.

Sequences join and leave between any two steps. KV memory: `engine.generate.kv_pool`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.generate.decoder_io import MASKED, past_key, past_value
from engine.generate.errors import GenerateError
from engine.generate.gguf_model import LlamaConfig
from engine.generate.kv_pool import PAD_SLOT, BlockPool, BlockTable
from engine.generate.sampling import SamplingParams, sample

F32 = NDArray[np.float32]
log = logging.getLogger("engine.generate")
BATCH_SIZE_HISTORY = 4096
RunDecoder = Callable[[dict[str, NDArray[Any]]], dict[str, F32]]


@dataclass(frozen=True)
class Delta:
    """A piece of the answer: new text, the token ids it came from, and on the last one why
    generation stopped (`"stop"`: a stop token or string; `"length"`: max_tokens or context)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None


@dataclass
class Request:
    """One generation, as the scheduler receives it. `emit` must be thread-safe; it gets
    Deltas, then an exception or nothing, then None (the end)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    emit: Callable[[Delta | BaseException | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still start one of `stops`."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class SequenceState:
    """A request in the scheduler: its block table, sampler state and the text handed out."""

    def __init__(
        self,
        request: Request,
        config: LlamaConfig,
        stop_ids: frozenset[int],
        decode: Any,
        pool: BlockPool,
    ) -> None:
        self.request = request
        self._stop_ids = stop_ids
        self._decode = decode
        self.rng = np.random.default_rng(request.seed)
        prompt = len(request.prompt_ids)
        self.limit = min(prompt + request.max_tokens, config.context_length)
        self.cache = BlockTable(pool)
        self.generated: list[int] = []
        self._pending: list[int] = []  # token ids not yet handed out with text
        self._emitted = 0  # characters of the decoded text already handed out
        self._stable = ""  # decoded text of generated[: self._stable_tokens], final
        self._stable_tokens = 0

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

    def accept(self, logits: F32) -> bool:
        """Sample the next token from `logits`, hand out text; True when finished."""
        request = self.request
        token = sample(logits, request.sampling, self.rng)
        if token in self._stop_ids:
            self._finish(self._text(), "stop")
            return True
        self.generated.append(token)
        self._pending.append(token)
        text = self._text()
        cut = min((i for s in request.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._finish(text[:cut], "stop")
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

    def _finish(self, text: str, reason: str) -> None:
        self.cache.free()  # before the caller hears of the end: its memory is back already
        self.request.emit(Delta(text[self._emitted :], tuple(self._pending), reason))
        self.request.emit(None)


class Scheduler:
    """Owns the decoder on one thread and batches every running sequence into each call."""

    def __init__(
        self,
        run_decoder: RunDecoder,
        config: LlamaConfig,
        stop_token_ids: frozenset[int],
        decode: Callable[[list[int]], str],
        *,
        max_batch: int = 16,
        prefill_tokens: int = 512,
        kv_cache_tokens: int = 8192,
        block_size: int = 16,
        prefix_cache: bool = True,
        name: str = "generate",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.pool = BlockPool(config, -(-kv_cache_tokens // block_size) + 1, block_size)
        self.prefix_cache = prefix_cache
        self._run_decoder = run_decoder
        self._config = config
        self._stop_ids = stop_token_ids
        self._decode = decode
        self._inbox: queue.SimpleQueue[SequenceState | None] = queue.SimpleQueue()
        self._waiting: deque[SequenceState] = deque()
        self._running: list[SequenceState] = []  # in admission order
        self._closed = False
        # decode batch size of the latest steps (bounded: the scheduler runs for months)
        self.batch_sizes: deque[int] = deque(maxlen=BATCH_SIZE_HISTORY)
        self.decode_steps = 0
        self.preemptions = 0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue `request`. Raises `GenerateError` once closed (or if the loop died), or if
        the request could not fit the KV pool even alone."""
        if self._closed or not self._thread.is_alive():
            raise GenerateError("the generator is closed")
        state = SequenceState(request, self._config, self._stop_ids, self._decode, self.pool)
        needed = self.pool.blocks_for(state.limit)
        if needed > self.pool.usable_blocks:
            raise GenerateError(
                f"the request needs up to {state.limit} tokens of KV cache; the pool holds "
                f"{self.pool.usable_blocks * self.pool.block_size}: lower max_tokens or raise "
                "kv_cache_tokens"
            )
        self._inbox.put(state)

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
            for seq in [*self._waiting, *self._running]:
                seq.request.emit(GenerateError(f"the generation scheduler stopped: {exc!r}"))
                seq.request.emit(None)
            self._waiting.clear()
            self._running.clear()
            raise

    def _loop(self) -> None:
        closing = False
        while not closing or self._waiting or self._running:
            idle = not self._waiting and not self._running
            try:
                item = self._inbox.get(block=idle and not closing)
            except queue.Empty:
                item = None
            else:
                if item is None:
                    closing = True
                else:
                    self._waiting.append(item)
                    continue  # take every queued request before running a step
            self._drop_cancelled()
            admitted = self._admissible()
            if admitted:
                self._admit(admitted)
            if self._running:
                self._decode_step()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.request.cancelled.is_set()]:
            self._waiting.remove(seq)
            seq.cache.free()
            seq.request.emit(None)
        for seq in [s for s in self._running if s.request.cancelled.is_set()]:
            self._running.remove(seq)
            seq.cache.free()
            seq.request.emit(None)

    def _admissible(self) -> list[SequenceState]:
        """The oldest waiting sequences that fit the free rows, the free KV blocks and the
        prefill token budget (the first one needs only rows and blocks)."""
        admitted: list[SequenceState] = []
        # Conservative: shared prefix blocks would need fewer, never more.
        tokens, free = 0, self.pool.available_blocks
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            prompt = self._waiting[0].tokens_to_prefill()
            need = self.pool.blocks_for(len(prompt))
            # the budget counts what must be computed: a cached prefix costs nothing
            n = len(prompt) - (self.pool.cached_tokens(prompt) if self.prefix_cache else 0)
            if need > free or (admitted and tokens + n > self.prefill_tokens):
                break
            admitted.append(self._waiting.popleft())
            tokens, free = tokens + n, free - need
        return admitted

    def _admit(self, batch: list[SequenceState]) -> None:
        prompts = [s.tokens_to_prefill() for s in batch]
        if self.prefix_cache:
            rest = [p[s.cache.share_prefix(p) :] for s, p in zip(batch, prompts, strict=True)]
        else:
            rest = prompts
        try:
            logits = self._run(batch, rest)
            if self.prefix_cache:
                for s in batch:
                    self.pool.remember(s.request.prompt_ids, s.cache.blocks)
            finished = {id(s) for s, row in zip(batch, logits, strict=True) if s.accept(row)}
        except Exception as exc:
            self._fail(batch, exc)
            return
        for seq in batch:
            if id(seq) in finished:
                seq.cache.free()
            else:
                self._running.append(seq)

    def _make_room(self) -> None:
        """Free blocks for one more token of every running sequence, preempting the most
        recently admitted ones (they go back to the front of the queue and are recomputed)."""
        needed = sum(s.cache.blocks_needed(1) for s in self._running)
        while needed > self.pool.available_blocks and len(self._running) > 1:
            victim = self._running.pop()
            needed -= victim.cache.blocks_needed(1)
            victim.cache.free()
            self._waiting.appendleft(victim)
            self.preemptions += 1

    def _decode_step(self) -> None:
        self._make_room()
        batch = list(self._running)
        self.batch_sizes.append(len(batch))
        self.decode_steps += 1
        try:
            logits = self._run(batch, [[s.generated[-1]] for s in batch])
            finished = {id(s) for s, row in zip(batch, logits, strict=True) if s.accept(row)}
        except Exception as exc:
            self._fail(batch, exc)
            return
        for seq in [s for s in self._running if id(s) in finished]:
            seq.cache.free()
        self._running = [s for s in self._running if id(s) not in finished]

    def _fail(self, batch: list[SequenceState], exc: Exception) -> None:
        log.exception("generation step failed for %d sequence(s)", len(batch), exc_info=exc)
        for seq in batch:
            if seq in self._running:
                self._running.remove(seq)
            seq.cache.free()
            seq.request.emit(GenerateError(f"generation failed: {exc}"))
            seq.request.emit(None)

    def _run(self, batch: list[SequenceState], tokens: list[list[int]]) -> F32:
        """One decoder call: `tokens[r]` follow row r's cache; the last real token's logits.
        Each row's past is gathered from its blocks (padding reads the zero block)."""
        cfg = self._config
        rows, seq = len(batch), max(len(t) for t in tokens)
        width = max(s.cache.length for s in batch)
        ids = np.zeros((rows, seq), np.int64)
        positions = np.zeros((rows, seq), np.int64)
        bias = np.full((rows, seq, width + seq), MASKED, np.float32)
        causal = np.triu(np.full((seq, seq), MASKED, np.float32), k=1)
        slots = np.full((rows, width), PAD_SLOT, np.int64)
        for r, (s, new) in enumerate(zip(batch, tokens, strict=True)):
            past, n = s.cache.length, len(new)
            ids[r, :n] = new
            positions[r] = np.arange(past, past + seq)
            bias[r, :, :past] = 0.0
            bias[r, :, width:] = causal
            slots[r, :past] = s.cache.slots(0, past)
        feeds: dict[str, NDArray[Any]] = {
            "input_ids": ids,
            "position_ids": positions,
            "attention_bias": bias,
            "logits_index": np.array([[len(t) - 1] for t in tokens], np.int64),
        }
        for i in range(cfg.n_layers):
            feeds[past_key(i)] = self.pool.keys[i][slots]
            feeds[past_value(i)] = self.pool.values[i][slots]
        outputs = self._run_decoder(feeds)
        for r, (s, new) in enumerate(zip(batch, tokens, strict=True)):
            s.cache.store(outputs, r, len(new))
        return outputs["logits"][:, 0]
