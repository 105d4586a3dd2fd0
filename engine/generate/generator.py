"""`Generator`: stream text from a converted model on ONNX Runtime, off the event loop.

    generator = Generator(ensure_model("smollm2"))   # from engine.generate.build
    async for delta in generator.generate([{"role": "user", "content": "Hi"}], max_tokens=64):
        print(delta.text, end="")          # delta.token_ids, delta.finish_reason on the last

Concurrent `generate` calls share decoder calls through continuous batching
(`engine.generate.batching`), on one worker thread that owns the ONNX Runtime session.
Events reach the caller's loop with `call_soon_threadsafe`. Breaking out of the `async for`
(or cancelling the task) drops the request before the next step and frees its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.generate.batching import Delta, Request, Scheduler
from engine.generate.decoder_io import DECODER_FILE, GENERATION_FILE, TOKENIZER_FILE
from engine.generate.errors import GenerateError
from engine.generate.gguf_model import LlamaConfig
from engine.generate.sampling import SamplingParams
from engine.generate.tokenizer import ChatTemplate

__all__ = ["Delta", "Generator", "Messages"]

Messages = Sequence[Mapping[str, Any]]


class Generator:
    """Text generation with one converted model directory (see `engine.generate.build`).

    `max_batch` bounds how many sequences share one decoder call; `prefill_tokens` bounds the
    prompt tokens admitted in one step (a longer prompt is still admitted, alone);
    `kv_cache_tokens` sizes the KV pool, allocated once in blocks of `block_size` tokens
    (fp32: 45 KiB a token for SmolLM2); when it runs out the newest sequences are preempted
    and recomputed later; with `prefix_cache`, prompts that start like an earlier one (a shared
    system prompt) reuse its KV blocks instead of recomputing them;
    `intra_op_threads` is ONNX Runtime's thread count for the decoder (0: one per core)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_batch: int = 16,
        prefill_tokens: int = 512,
        kv_cache_tokens: int = 8192,
        block_size: int = 16,
        prefix_cache: bool = True,
        intra_op_threads: int = 0,
    ) -> None:
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
        self._scheduler = Scheduler(
            self._run_decoder,
            self.config,
            self.stop_token_ids,
            self.decode,
            max_batch=max_batch,
            prefill_tokens=prefill_tokens,
            kv_cache_tokens=kv_cache_tokens,
            block_size=block_size,
            prefix_cache=prefix_cache,
            name=f"generate-{self.name}",
        )

    @property
    def batch_sizes(self) -> list[int]:
        """The decode batch size of each of the latest 4,096 steps (how well requests shared
        decoder calls)."""
        return list(self._scheduler.batch_sizes)

    @property
    def decode_steps(self) -> int:
        """Decode calls run so far."""
        return self._scheduler.decode_steps

    def close(self) -> None:
        """Finish the requests already submitted, then stop the worker thread."""
        self._scheduler.close()

    def _run_decoder(self, feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[np.float32]]:
        outputs = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, outputs, strict=True))

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
        if isinstance(stop, str):
            stop = [stop]
        sampling = SamplingParams(temperature, top_p, top_k)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        text = prompt if isinstance(prompt, str) else self.render(prompt)
        prompt_ids = self.encode(text)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.config.context_length:
            raise GenerateError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds "
                f"{self.config.context_length}"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

        def emit(item: Delta | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        request = Request(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            seed=seed,
            stop=tuple(s for s in stop if s),
            emit=emit,
        )
        self._scheduler.submit(request)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()
