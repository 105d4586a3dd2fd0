"""`Generator`: stream text from a converted model on ONNX Runtime, off the event loop.

    generator = Generator(ensure_model("smollm2"))
    async for delta in generator.generate([{"role": "user", "content": "Hi"}], max_tokens=64):
        print(delta.text, end="")          # delta.token_ids, delta.finish_reason on the last

One worker thread owns the ONNX Runtime session and runs requests one at a time, in arrival
order (continuous batching comes next); each request keeps its KV cache in a host buffer,
sequence-major, that grows in place: the decoder sees `cache[:length]` as its past without a
copy. Events reach the caller's loop with `call_soon_threadsafe`. Breaking out of the `async
for` (or cancelling the task) stops the request at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.generate.build import DECODER_FILE, GENERATION_FILE, TOKENIZER_FILE
from engine.generate.decoder_io import MASKED, new_key, new_value, past_key, past_value
from engine.generate.errors import GenerateError
from engine.generate.gguf_model import LlamaConfig
from engine.generate.sampling import SamplingParams, sample
from engine.generate.tokenizer import ChatTemplate

Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Delta:
    """A piece of the answer: new text, the token ids it came from, and on the last one why
    generation stopped (`"stop"`: a stop token or string; `"length"`: max_tokens or context)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    emit: Any  # callable(Delta | BaseException | None), thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)


class _KVCache:
    """One sequence's keys and values, [layers][capacity, kv_heads, head_dim], grown by doubling."""

    def __init__(self, config: LlamaConfig, capacity: int) -> None:
        self._config = config
        self.length = 0
        shape = (capacity, config.n_kv_heads, config.head_dim)
        self.keys = [np.empty(shape, np.float32) for _ in range(config.n_layers)]
        self.values = [np.empty(shape, np.float32) for _ in range(config.n_layers)]

    def feeds(self) -> dict[str, NDArray[np.float32]]:
        feeds = {}
        for i in range(self._config.n_layers):
            feeds[past_key(i)] = self.keys[i][None, : self.length]
            feeds[past_value(i)] = self.values[i][None, : self.length]
        return feeds

    def append(self, outputs: dict[str, NDArray[np.float32]], n: int) -> None:
        end = self.length + n
        if end > self.keys[0].shape[0]:
            capacity = max(end, 2 * self.keys[0].shape[0])
            for cache in (self.keys, self.values):
                for i, old in enumerate(cache):
                    grown = np.empty((capacity, *old.shape[1:]), np.float32)
                    grown[: self.length] = old[: self.length]
                    cache[i] = grown
        for i in range(self._config.n_layers):
            self.keys[i][self.length : end] = outputs[new_key(i)][0]
            self.values[i][self.length : end] = outputs[new_value(i)][0]
        self.length = end


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still start one of `stops`."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class Generator:
    """Text generation with one converted model directory (see `engine.generate.build`)."""

    def __init__(self, model_dir: Path, *, intra_op_threads: int = 0) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        try:
            meta = json.loads((model_dir / GENERATION_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise GenerateError(
                f"{model_dir} is not a converted model directory ({exc}); build it with "
                "python -m engine.generate.build"
            ) from exc
        self.model_dir = model_dir
        self.name: str = meta["name"]
        self.config = LlamaConfig.from_json(meta["config"])
        self.stop_token_ids = frozenset(int(t) for t in meta["stop_token_ids"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        template = meta.get("chat_template")
        self.chat_template = ChatTemplate(template) if template else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(
            str(model_dir / DECODER_FILE), options, providers=["CPUExecutionProvider"]
        )
        self._output_names = [o.name for o in self._session.get_outputs()]
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"generate-{self.name}")

    def close(self) -> None:
        """Stop the worker once the requests already submitted have finished."""
        self._executor.shutdown(wait=True)

    # -- prompts ---------------------------------------------------------------------------

    def render(self, messages: Messages) -> str:
        """The prompt text of a chat, with the assistant's turn opened."""
        if self.chat_template is None:
            raise GenerateError(f"model {self.name!r} has no chat template: pass a prompt string")
        return self.chat_template.render(messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    # -- generation ------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Messages,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncIterator[Delta]:
        """Stream the continuation of `prompt` (text, or chat messages rendered with the
        model's template). The last delta has a `finish_reason`; stop strings are not part of
        the text. Raises `ValueError` for bad arguments, `GenerateError` if the prompt does
        not fit the context."""
        text = prompt if isinstance(prompt, str) else self.render(prompt)
        prompt_ids = self.encode(text)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.config.context_length:
            raise GenerateError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds "
                f"{self.config.context_length}"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        request = _Request(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature, top_p, top_k),
            seed=seed,
            stop=tuple(s for s in stop if s),
            emit=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
        )
        self._executor.submit(self._run_guarded, request)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()

    def _run_guarded(self, request: _Request) -> None:
        try:
            self._run(request)
        except Exception as exc:
            request.emit(GenerateError(f"generation failed: {exc}"))
        request.emit(None)

    def _step(self, cache: _KVCache, token_ids: list[int]) -> NDArray[np.float32]:
        """Run the decoder on `token_ids` after the cached ones; the last token's logits."""
        n, past = len(token_ids), cache.length
        bias = np.zeros((1, n, past + n), np.float32)
        bias[0, :, past:] = np.triu(np.full((n, n), MASKED, np.float32), k=1)
        feeds: dict[str, NDArray[Any]] = {
            "input_ids": np.array([token_ids], np.int64),
            "position_ids": np.arange(past, past + n, dtype=np.int64)[None],
            "attention_bias": bias,
            "logits_index": np.array([[n - 1]], np.int64),
            **cache.feeds(),
        }
        outputs = dict(zip(self._output_names, self._session.run(None, feeds), strict=True))
        cache.append(outputs, n)
        return outputs["logits"][0, -1]

    def _run(self, request: _Request) -> None:
        rng = np.random.default_rng(request.seed)
        limit = min(len(request.prompt_ids) + request.max_tokens, self.config.context_length)
        cache = _KVCache(self.config, capacity=min(limit, 2 * len(request.prompt_ids) + 64))
        logits = self._step(cache, request.prompt_ids)
        generated: list[int] = []
        pending: list[int] = []  # token ids not yet handed out with text
        emitted = 0  # characters of the decoded text already handed out
        while not request.cancelled.is_set():
            token = sample(logits, request.sampling, rng)
            if token in self.stop_token_ids:
                request.emit(Delta(self.decode(generated)[emitted:], tuple(pending), "stop"))
                return
            generated.append(token)
            pending.append(token)
            text = self.decode(generated)
            cut = min((i for s in request.stop if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                request.emit(Delta(text[emitted:cut], tuple(pending), "stop"))
                return
            if len(generated) >= request.max_tokens or cache.length + 1 >= limit:
                request.emit(Delta(text[emitted:], tuple(pending), "length"))
                return
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for more
                ready = len(text) - _held_back(text, request.stop)
                if ready > emitted:
                    request.emit(Delta(text[emitted:ready], tuple(pending)))
                    emitted, pending = ready, []
            logits = self._step(cache, [token])
