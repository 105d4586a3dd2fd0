"""`Generation`: one generation as the daemon runs it (OpenAI endpoint, agents' `generate`).

    generation = Generation(generator, "smollm2", messages, max_tokens=64, temperature=0.7)
    async for delta in generation:          # engine.generate Deltas
        print(delta.text, end="")
    generation.usage                        # Usage(prompt_tokens, completion_tokens)

Sampling parameters follow `Generator.generate`'s contract. A parameter this engine does not
take yet is dropped when it is a scheduling hint (`priority`, `deadline_s`) or left at its
neutral value, and refused with a `GenerationError` naming it otherwise, so a request never
silently samples differently from what it asked. Breaking out of the loop (or `aclose()`, or
cancelling the task) cancels the generation and frees its sequence at once.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from gatewayd.generation import metrics

# The contract's sampling parameters and their neutral values.
NEUTRAL: dict[str, Any] = {
    "max_tokens": None,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "seed": None,
    "stop": (),
    "stop_token_ids": (),
    "priority": 0,
    "deadline_s": None,
}
HINTS = frozenset({"priority", "deadline_s"})  # scheduling only: dropped if not supported


class GenerationError(Exception):
    """A generation cannot start as asked: unknown model, unsupported parameter. `param`
    names the request field, `code` is OpenAI's error code."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def pick_generator(generators: Mapping[str, Any], model: str | None) -> tuple[str, Any]:
    """`(name, generator)` for `model`, or the first configured one when `model` is None."""
    if not generators:
        raise GenerationError(
            "no language model is configured on this gateway (add a [generators.NAME] section)",
            param="model",
            code="model_not_found",
        )
    if model is None:
        name = next(iter(generators))
        return name, generators[name]
    if model not in generators:
        raise GenerationError(
            f"the model {model!r} does not exist on this gateway (it serves: "
            f"{', '.join(generators)})",
            param="model",
            code="model_not_found",
        )
    return model, generators[model]


_accepted_cache: dict[type, frozenset[str] | None] = {}


def accepted_params(generator: Any) -> frozenset[str] | None:
    """The keyword arguments `generator.generate` takes (None: it takes any)."""
    kind = type(generator)
    if kind not in _accepted_cache:
        parameters = inspect.signature(generator.generate).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            _accepted_cache[kind] = None
        else:
            _accepted_cache[kind] = frozenset(
                p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY
            )
    return _accepted_cache[kind]


def engine_arguments(generator: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments to pass for `params` (None values: the engine's default)."""
    accepted = accepted_params(generator)
    arguments: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if key not in NEUTRAL:
            raise GenerationError(f"unknown sampling parameter {key!r}", param=key)
        if accepted is not None and key not in accepted:
            neutral = NEUTRAL[key]
            if key in HINTS or value == neutral or (neutral == () and not value):
                continue
            raise GenerationError(
                f"{key} is not supported by this gateway's generation engine yet", param=key
            )
        arguments[key] = tuple(value) if isinstance(value, list) else value
    return arguments


def _usage_field(usage: Any, key: str) -> int | None:
    value = usage.get(key) if isinstance(usage, Mapping) else getattr(usage, key, None)
    return int(value) if isinstance(value, int) else None


class Generation:
    """One generation of `generator` (named `model` in metrics): an async iterator of the
    engine's deltas; `usage` and `finish_reason` are complete once it ends."""

    def __init__(self, generator: Any, model: str, prompt: Any, **params: Any) -> None:
        self.generator = generator
        self.model = model
        self.prompt = prompt
        self.arguments = engine_arguments(generator, params)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._prompt_tokens: int | None = None
        self._stream = self._deltas()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Any:
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def text(self) -> str:
        """Run to the end; the whole text."""
        return "".join([delta.text async for delta in self])

    @property
    def prompt_tokens(self) -> int:
        if self._prompt_tokens is None:  # an engine whose last delta carries no usage
            prompt = self.prompt
            text = prompt if isinstance(prompt, str) else self.generator.render(prompt)
            self._prompt_tokens = len(self.generator.encode(text))
        return self._prompt_tokens

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    async def _deltas(self) -> AsyncGenerator[Any, None]:
        model = self.model
        started = time.perf_counter()
        last: float | None = None
        outcome = "cancelled"
        metrics.IN_FLIGHT.labels(model).inc()
        try:
            async with aclosing(self.generator.generate(self.prompt, **self.arguments)) as stream:
                async for delta in stream:
                    now = time.perf_counter()
                    if last is None:
                        metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(now - started)
                    else:
                        metrics.INTER_TOKEN.labels(model).observe(now - last)
                    last = now
                    self.completion_tokens += len(delta.token_ids)
                    usage = getattr(delta, "usage", None)
                    if usage is not None:
                        self._prompt_tokens = _usage_field(usage, "prompt_tokens")
                        done = _usage_field(usage, "completion_tokens")
                        self.completion_tokens = self.completion_tokens if done is None else done
                    if delta.finish_reason is not None:
                        self.finish_reason = outcome = str(delta.finish_reason)
                    yield delta
        except Exception:
            outcome = "error"
            raise
        finally:
            metrics.IN_FLIGHT.labels(model).dec()
            metrics.REQUESTS.labels(model, outcome).inc()
            if last is not None:  # the prompt was prefilled
                metrics.COMPLETION_TOKENS.labels(model).inc(self.completion_tokens)
                with contextlib.suppress(Exception):  # counting must not mask how it ended
                    metrics.PROMPT_TOKENS.labels(model).inc(self.prompt_tokens)
