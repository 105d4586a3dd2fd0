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
import concurrent.futures
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.generate.batching import Delta, Request, Scheduler, Usage
from engine.generate.decoder_io import DECODER_FILE, GENERATION_FILE, TOKENIZER_FILE
from engine.generate.errors import GenerateError
from engine.generate.gguf_model import LlamaConfig
from engine.generate.sampling import SamplingParams
from engine.generate.tokenizer import ChatTemplate

__all__ = ["Delta", "Generator", "GeneratorStats", "Messages", "Usage"]

Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class GeneratorStats:
    """A snapshot of the scheduler, for metrics. Sequences: `running` (admitted: prefilling or
    decoding), `waiting` (queued, or preempted and to be recomputed). KV blocks: `used`, `free`
    (free or held only by the prefix cache, hence reclaimable). `prefix_cache_hit_rate`: the
    share of full prompt blocks looked up that were found cached. Token and preemption counts
    since start. Latency percentiles (seconds) over the latest 4,096 samples, 0.0 before any:
    time to first token (from submission) and inter-token latency."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache_hit_rate: float
    prefill_tokens_total: int
    decode_tokens_total: int
    preemptions_total: int
    ttft_p50_s: float
    ttft_p99_s: float
    inter_token_p50_s: float
    inter_token_p99_s: float


def _percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) if samples else 0.0


class Generator:
    """Text generation with one converted model directory (see `engine.generate.build`).

    `max_batch` bounds how many sequences are admitted (decoding or prefilling) at once;
    `prefill_tokens` is the per-step budget of prompt tokens (chunked prefill: a longer prompt
    goes in over several steps, and each step also advances every decoding sequence, so the
    budget bounds the inter-token latency a prompt adds: ~1 CPU-s for 256 tokens of SmolLM2);
    `kv_cache_tokens` sizes the KV pool, allocated once in blocks of `block_size` tokens
    (fp32: 45 KiB a token for SmolLM2); when it runs out the lowest-priority, newest sequences
    are preempted and recomputed later; with `prefix_cache`, prompts that start like an earlier one (a shared
    system prompt) reuse its KV blocks instead of recomputing them;
    `intra_op_threads` is ONNX Runtime's thread count for the decoder (0: one per core);
    `replicas` > 1 loads that many decoder sessions (the weights once each) and runs the rows
    of a step on them in parallel, prefill spread over as many packed rows: on a small CPU,
    one single-threaded replica per core uses the cores better than one session's threads
    (bench/generate.py)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_batch: int = 16,
        prefill_tokens: int = 256,
        kv_cache_tokens: int = 8192,
        block_size: int = 16,
        prefix_cache: bool = True,
        intra_op_threads: int = 0,
        replicas: int = 1,
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
        # Idle pool threads sleep instead of spinning: measured on 2 shared cores, spinning
        # cost 35-45% more CPU per decoder call for the same work (and starves neighbours).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._ort = ort
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self._sessions = [
            ort.InferenceSession(
                str(model_dir / DECODER_FILE), options, providers=["CPUExecutionProvider"]
            )
            for _ in range(replicas)
        ]
        self._session = self._sessions[0]
        self._helpers = (
            concurrent.futures.ThreadPoolExecutor(replicas - 1, f"generate-{self.name}-replica")
            if replicas > 1
            else None
        )
        self._output_names = [o.name for o in self._session.get_outputs()]
        self._pinned: dict[str, tuple[NDArray[Any], Any]] = {}  # pool arrays as OrtValues
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
            prefill_rows=replicas,
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
        if self._helpers is not None:
            self._helpers.shutdown()

    def stats(self) -> GeneratorStats:
        """The scheduler's state after its latest step (cheap; safe from any thread)."""
        scheduler = self._scheduler
        admitted, waiting, available = scheduler.counts
        pool = scheduler.pool
        ttft = list(scheduler.latencies.ttft)
        inter_token = list(scheduler.latencies.inter_token)
        lookups = pool.prefix_lookups
        return GeneratorStats(
            running=admitted,
            waiting=waiting,
            kv_blocks_used=pool.usable_blocks - available,
            kv_blocks_free=available,
            prefix_cache_hit_rate=pool.prefix_hits / lookups if lookups else 0.0,
            prefill_tokens_total=scheduler.prefill_tokens_total,
            decode_tokens_total=scheduler.decode_tokens_total,
            preemptions_total=scheduler.preemptions,
            ttft_p50_s=_percentile(ttft, 50),
            ttft_p99_s=_percentile(ttft, 99),
            inter_token_p50_s=_percentile(inter_token, 50),
            inter_token_p99_s=_percentile(inter_token, 99),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """KV memory one token of a sequence takes."""
        return self._scheduler.pool.bytes_per_token

    def _run_decoder(self, feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[np.float32]]:
        """One decoder call; with replicas, its rows split among them and run in parallel
        (the pool is shared: the graph only reads it)."""
        rows = feeds["input_ids"].shape[0]
        parts = min(len(self._sessions), rows)
        if parts == 1 or self._helpers is None:
            return self._run_session(self._session, feeds)
        bounds = np.linspace(0, rows, parts + 1).astype(int)
        split = [
            {
                name: value if name.startswith("pool_") else value[bounds[k] : bounds[k + 1]]
                for name, value in feeds.items()
            }
            for k in range(parts)
        ]
        futures = [
            self._helpers.submit(self._run_session, self._sessions[k], split[k])
            for k in range(1, parts)
        ]
        results = [self._run_session(self._sessions[0], split[0])]
        results += [future.result() for future in futures]
        return {name: np.concatenate([r[name] for r in results]) for name in self._output_names}

    def _run_session(
        self, session: Any, feeds: dict[str, NDArray[Any]]
    ) -> dict[str, NDArray[np.float32]]:
        """One session run. The KV pool's arrays go in as OrtValues made once over their
        memory (ONNX Runtime reads the pool in place, never a copy of it)."""
        values = {}
        for name, array in feeds.items():
            pinned = self._pinned.get(name)
            if pinned is None or pinned[0] is not array:
                if not name.startswith("pool_"):
                    values[name] = self._ort.OrtValue.ortvalue_from_numpy(array)
                    continue
                pinned = (array, self._ort.OrtValue.ortvalue_from_numpy(array))
                self._pinned[name] = pinned
            values[name] = pinned[1]
        outputs = session.run_with_ort_values(self._output_names, values)
        return {n: o.numpy() for n, o in zip(self._output_names, outputs, strict=True)}

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
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        priority: int = 0,
        deadline_s: float | None = None,
        json_mode: bool = False,
        ignore_eos: bool = False,
    ) -> AsyncIterator[Delta]:
        """Stream the continuation of `prompt` (text, or chat messages rendered with the
        model's template). The last delta has a `finish_reason` ("stop": a stop token, one of
        `stop_token_ids` or a `stop` string, which is not part of the text; "length";
        "cancelled"; "deadline": `deadline_s` seconds passed, the text so far is kept) and
        the token `usage`. Higher `priority` is admitted first and preempted last. With
        `json_mode` the answer is a JSON object or array: tokens that would break it are never
        chosen, and it ends ("stop") when the value is complete ("length" leaves it cut).
        `ignore_eos` lets the model's own stop tokens pass (for benchmarks of a fixed answer
        length; `stop_token_ids` still end it). Raises
        `ValueError` for bad arguments, `GenerateError` if the prompt does not fit the
        context."""
        if isinstance(stop, str):
            stop = [stop]
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 seconds, got {deadline_s}")
        bad_ids = [t for t in stop_token_ids if not 0 <= int(t) < self.config.vocab_size]
        if bad_ids:
            raise ValueError(
                f"stop_token_ids {bad_ids} are not in the vocabulary (0..{self.config.vocab_size - 1})"
            )
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
            stop_token_ids=frozenset(int(t) for t in stop_token_ids),
            priority=int(priority),
            deadline=None if deadline_s is None else time.monotonic() + deadline_s,
            json_mode=json_mode,
            ignore_eos=ignore_eos,
        )
        self._scheduler.submit(request)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()
