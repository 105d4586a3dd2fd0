"""`LocalBackend`: answers from the gateway's own generation engine (engine/generate).

    backend = LocalBackend(generator)                 # an engine.generate.Generator
    backend = LocalBackend(lambda: components.generators["smollm2"])   # resolved when used

It calls `generator.generate(messages, max_tokens=..., temperature=..., top_p=..., top_k=...,
seed=..., stop=...)`, an async iterator of deltas (`.text`, `.finish_reason` on the last), with
role/content messages the model's chat template renders. Small local models have no native
tool-call format, so tools are described in the prompt and calls parsed from the text
(prompt_tools.py). Duck-typed: this module never imports `engine` (the daemon hands it the
generator it built).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from gatewayd.chat.messages import Chunk, Message
from gatewayd.chat.prompt_tools import STOP, ToolCallParser, prompt_messages


class LocalBackend:
    """See the module docstring. `generator`: the generator, or a function returning it (so
    a config can name a generator that is built after the agent classes are loaded)."""

    def __init__(
        self,
        generator: Any,
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self._generator = generator
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed

    def generator(self) -> Any:
        found = self._generator
        if callable(found) and not hasattr(found, "generate"):
            found = found()
        return found

    async def stream(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncIterator[Chunk]:
        generator = self.generator()
        chat = prompt_messages(messages, system, tools)
        parser = ToolCallParser()
        finish_reason = None
        yield {"type": "start"}
        async for delta in generator.generate(
            chat,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=STOP if tools else (),
        ):
            for chunk in parser.feed(delta.text):
                yield chunk
            finish_reason = delta.finish_reason or finish_reason
        for chunk in parser.flush():
            yield chunk
        yield {"type": "finish", "metadata": {"finishReason": finish_reason}}
