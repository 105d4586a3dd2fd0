"""Continuous batching on one worker thread: every decoder call advances all running sequences.

The scheduler loop, on its own thread (it owns the ONNX Runtime session):
1. takes new requests; drops cancelled ones (their memory is freed at once);
2. admits waiting requests, oldest first, while fewer than `max_batch` run and their prompts
   fit `prefill_tokens` (at least one is admitted per step): their prompts are prefilled
   together in one call (padded, masked) and each one's first token sampled. Chunked prefill
   mixed into decode steps is next: today a step with prompts delays the running sequences
   by that prefill;
3. runs one decode call for every running sequence (one new token each, past KV padded to
   the longest and masked), samples each row, hands out text, retires finished sequences.

Sequences join and leave between any two steps. Each keeps its KV in its own host buffer
(sequence-major, grown by doubling); a paged block pool is the next step, and the decoder's
I/O (per-layer past in, new KV out, additive mask) was shaped for it.
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

from engine.generate.decoder_io import MASKED, new_key, new_value, past_key, past_value
from engine.generate.errors import GenerateError
from engine.generate.gguf_model import LlamaConfig
from engine.generate.sampling import SamplingParams, sample

F32 = NDArray[np.float32]
log = logging.getLogger("engine.generate")
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


class KVCache:
    """One sequence's keys and values, [layers][capacity, kv_heads, head_dim], grown by doubling."""

    def __init__(self, config: LlamaConfig, capacity: int) -> None:
        self.n_layers = config.n_layers
        self.length = 0
        shape = (capacity, config.n_kv_heads, config.head_dim)
        self.keys = [np.empty(shape, np.float32) for _ in range(config.n_layers)]
        self.values = [np.empty(shape, np.float32) for _ in range(config.n_layers)]

    def store(self, outputs: dict[str, F32], row: int, n: int) -> None:
        """Append the first `n` new tokens of batch row `row`."""
        end = self.length + n
        if end > self.keys[0].shape[0]:
            capacity = max(end, 2 * self.keys[0].shape[0])
            for cache in (self.keys, self.values):
                for i, old in enumerate(cache):
                    grown = np.empty((capacity, *old.shape[1:]), np.float32)
                    grown[: self.length] = old[: self.length]
                    cache[i] = grown
        for i in range(self.n_layers):
            self.keys[i][self.length : end] = outputs[new_key(i)][row, :n]
            self.values[i][self.length : end] = outputs[new_value(i)][row, :n]
        self.length = end


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still start one of `stops`."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class SequenceState:
    """A running request: its cache, sampler state and the text handed out so far."""

    def __init__(
        self, request: Request, config: LlamaConfig, stop_ids: frozenset[int], decode: Any
    ) -> None:
        self.request = request
        self._stop_ids = stop_ids
        self._decode = decode
        self.rng = np.random.default_rng(request.seed)
        prompt = len(request.prompt_ids)
        self.limit = min(prompt + request.max_tokens, config.context_length)
        self.cache = KVCache(config, capacity=min(self.limit, 2 * prompt + 64))
        self.generated: list[int] = []
        self._pending: list[int] = []  # token ids not yet handed out with text
        self._emitted = 0  # characters of the decoded text already handed out

    def accept(self, logits: F32) -> bool:
        """Sample the next token from `logits`, hand out text; True when finished."""
        request = self.request
        token = sample(logits, request.sampling, self.rng)
        if token in self._stop_ids:
            self._finish(self._decode(self.generated), "stop")
            return True
        self.generated.append(token)
        self._pending.append(token)
        text = self._decode(self.generated)
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
        name: str = "generate",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.prefill_tokens = prefill_tokens
        self._run_decoder = run_decoder
        self._config = config
        self._stop_ids = stop_token_ids
        self._decode = decode
        self.max_batch = max_batch
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._running: list[SequenceState] = []
        self._closed = False
        self.batch_sizes: list[int] = []  # decode batch size of every step (for tests, metrics)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue `request`; raises `GenerateError` once closed (or if the loop died)."""
        if self._closed or not self._thread.is_alive():
            raise GenerateError("the generator is closed")
        self._inbox.put(request)

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
                    late.emit(GenerateError("the generator is closed"))
                    late.emit(None)
        except BaseException as exc:  # a bug in the loop itself: nobody may wait forever
            log.exception("the generation scheduler stopped")
            for request in [*self._waiting, *(s.request for s in self._running)]:
                request.emit(GenerateError(f"the generation scheduler stopped: {exc!r}"))
                request.emit(None)
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
            if self._waiting and len(self._running) < self.max_batch:
                self._admit(self._admissible())
            if self._running:
                self._decode_step()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request.emit(None)
        for seq in [s for s in self._running if s.request.cancelled.is_set()]:
            self._running.remove(seq)
            seq.request.emit(None)

    def _admissible(self) -> list[Request]:
        """The oldest waiting requests that fit the free rows and the prefill token budget."""
        admitted = [self._waiting.popleft()]
        tokens = len(admitted[0].prompt_ids)
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            tokens += len(self._waiting[0].prompt_ids)
            if tokens > self.prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
        return admitted

    def _admit(self, requests: list[Request]) -> None:
        batch = [SequenceState(r, self._config, self._stop_ids, self._decode) for r in requests]
        try:
            logits = self._run(batch, [r.prompt_ids for r in requests])
            finished = {id(s) for s, row in zip(batch, logits, strict=True) if s.accept(row)}
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._running += [s for s in batch if id(s) not in finished]

    def _decode_step(self) -> None:
        batch = list(self._running)
        self.batch_sizes.append(len(batch))
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
            if seq in self._running:
                self._running.remove(seq)
            seq.request.emit(GenerateError(f"generation failed: {exc}"))
            seq.request.emit(None)

    def _run(self, batch: list[SequenceState], tokens: list[list[int]]) -> F32:
        """One decoder call: `tokens[r]` follow row r's cache; the last real token's logits."""
        cfg = self._config
        rows, seq = len(batch), max(len(t) for t in tokens)
        width = max(s.cache.length for s in batch)
        ids = np.zeros((rows, seq), np.int64)
        positions = np.zeros((rows, seq), np.int64)
        bias = np.full((rows, seq, width + seq), MASKED, np.float32)
        causal = np.triu(np.full((seq, seq), MASKED, np.float32), k=1)
        for r, (s, new) in enumerate(zip(batch, tokens, strict=True)):
            past, n = s.cache.length, len(new)
            ids[r, :n] = new
            positions[r] = np.arange(past, past + seq)
            bias[r, :, :past] = 0.0
            bias[r, :, width:] = causal
        feeds: dict[str, NDArray[Any]] = {
            "input_ids": ids,
            "position_ids": positions,
            "attention_bias": bias,
            "logits_index": np.array([[len(t) - 1] for t in tokens], np.int64),
        }
        shape = (rows, width, cfg.n_kv_heads, cfg.head_dim)
        for i in range(cfg.n_layers):
            if rows == 1:  # a view of the sequence's own buffer: no copy
                cache = batch[0].cache
                feeds[past_key(i)] = cache.keys[i][None, :width]
                feeds[past_value(i)] = cache.values[i][None, :width]
                continue
            keys, values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            for r, s in enumerate(batch):
                keys[r, : s.cache.length] = s.cache.keys[i][: s.cache.length]
                values[r, : s.cache.length] = s.cache.values[i][: s.cache.length]
            feeds[past_key(i)], feeds[past_value(i)] = keys, values
        outputs = self._run_decoder(feeds)
        for r, (s, new) in enumerate(zip(batch, tokens, strict=True)):
            s.cache.store(outputs, r, len(new))
        return outputs["logits"][:, 0]
