"""Agents call `self.generate(...)` on the runtime's generators: the same text as the engine,
streamed or whole, the first generator by default, a clear error without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from engine.generate import Generator
from gatewayd.agents import Agent, AgentRuntime, AgentSettings, NoEngineError, callable
from tests.generation.test_openai_api import engine_text


class Writer(Agent):
    initial_state: ClassVar[Any] = {"last": None}

    @callable
    async def write(self, prompt: str) -> str:
        text = await self.generate(prompt, max_tokens=8).text()
        self.set_state({"last": text})
        return text

    @callable
    async def chat(self, question: str, model: str | None = None) -> dict[str, Any]:
        pieces, reason = [], None
        generation = self.generate(
            [{"role": "user", "content": question}], model=model, max_tokens=6, temperature=0.0
        )
        async for delta in generation:
            pieces.append(delta.text)
            reason = delta.finish_reason or reason
        return {
            "text": "".join(pieces),
            "reason": reason,
            "tokens": generation.usage.completion_tokens,
        }


async def test_an_agent_generates_with_the_runtimes_model(tmp_path: Path, tiny: Generator) -> None:
    runtime = AgentRuntime(
        AgentSettings(state_dir=tmp_path), {"writer": Writer}, generators={"tiny": tiny}
    )
    await runtime.start()
    try:
        expected, _ = await engine_text(tiny, "The heater", max_tokens=8)
        assert await runtime.call("writer", "w-1", "write", "The heater") == expected
        assert (await runtime.get_agent_state("writer", "w-1"))["last"] == expected

        chat_expected, reason = await engine_text(
            tiny, [{"role": "user", "content": "Hi"}], max_tokens=6
        )
        answer = await runtime.call("writer", "w-1", "chat", "Hi", "tiny")
        assert answer == {"text": chat_expected, "reason": reason, "tokens": 6}

        with pytest.raises(NoEngineError, match=r"'gpt-4o' does not exist.*tiny"):
            await runtime.call("writer", "w-1", "chat", "Hi", "gpt-4o")
    finally:
        await runtime.close()


async def test_without_generators_generate_says_so(tmp_path: Path) -> None:
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path), {"writer": Writer})
    await runtime.start()
    try:
        with pytest.raises(NoEngineError, match=r"no language model is configured.*\[generators"):
            await runtime.call("writer", "w-1", "write", "x")
    finally:
        await runtime.close()
