"""One chat end to end with the REAL local model (SmolLM2-135M through engine/generate):
it answers, tool call or not, and the answer is stored. Marked `model` (downloads and
converts the model once into the model cache)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from gatewayd.chat import ChatAgent
from gatewayd.chat.local import LocalBackend
from gatewayd.tools import tool_from_function
from tests.chat.conftest import user

pytestmark = [pytest.mark.model, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    from engine.generate import Generator
    from engine.generate.build import ensure_model

    generator = Generator(ensure_model("smollm2"))
    yield generator
    generator.close()


def read_temperature(room: str) -> float:
    """The current temperature of a room, in °C."""
    return 19.5


class SiteChat(ChatAgent):
    backend: ClassVar[Any] = None
    system_prompt = "You are the assistant of a building's gateway. Answer briefly."
    tools = (tool_from_function(read_temperature),)
    max_steps = 3


async def test_the_local_model_answers_and_the_answer_is_stored(serve, smollm2):
    SiteChat.backend = LocalBackend(smollm2, max_tokens=48)
    async with serve({"chat": SiteChat}) as served, served.client("chat", "m1") as a:
        await a.send(
            "gw.chat.send", id="r1", messages=[user("u1", "How warm is it in the kitchen?")]
        )
        frames = await a.until_type("gw.chat.done")
        assert frames[-1]["status"] == "complete", frames[-1]
        chunks = [f["chunk"] for f in frames if f["type"] == "gw.chat.chunk"]
        assert chunks[0]["type"] == "start" and chunks[-1]["type"] == "finish"
        messages = await a.messages()
        assert [m["role"] for m in messages] == ["user", "assistant"]
        parts = messages[1]["parts"]
        assert parts, "the model said nothing"
        said = "".join(p.get("text", "") for p in parts if p["type"] == "text")
        calls = [p for p in parts if p["type"] == "tool"]
        assert said.strip() or calls
        for call in calls:  # a call the model made was run (or refused with a reason)
            assert call["state"] in ("output-available", "output-error"), call
