"""The local backend: the real generation engine (a tiny random-weight Llama, the engine
tests' model) behind a chat agent, and prompt-based tool calls for models without a native
format (parsed from text; the model there is a scripted double of a generator)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from gatewayd.chat import ChatAgent
from gatewayd.chat.local import LocalBackend
from gatewayd.chat.prompt_tools import ToolCallParser, prompt_messages
from gatewayd.tools import tool_from_function
from tests.chat.conftest import user

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from engine.generate import Generator
    from engine.generate.build import convert
    from tests.engine.generate.tiny_llama import write_tiny_llama

    gguf = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    generator = Generator(convert(gguf, gguf.parent / "model"), intra_op_threads=1)
    yield generator
    generator.close()


class Local(ChatAgent):
    backend: ClassVar[Any] = None


async def test_a_chat_agent_answers_through_the_generation_engine(serve, tiny_generator):
    Local.backend = LocalBackend(lambda: tiny_generator, max_tokens=12)
    expected = ""
    async for delta in tiny_generator.generate(
        [{"role": "user", "content": "hi"}], max_tokens=12, temperature=0.0
    ):
        expected += delta.text
    assert expected  # the random model says something
    async with serve({"chat": Local}) as served, served.client("chat", "l1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "hi")])
        frames = await a.until_type("gw.chat.done")
        assert frames[-1]["status"] == "complete"
        chunks = [f["chunk"] for f in frames if f["type"] == "gw.chat.chunk"]
        streamed = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
        assert streamed == expected
        assert chunks[-1]["metadata"]["finishReason"] in ("stop", "length")
        stored = (await a.messages())[1]
        assert stored["parts"] == [{"type": "text", "text": expected}]


def test_the_parser_streams_text_and_finds_calls_split_anywhere():
    text = 'Let me check. <tool_call>{"name": "read", "arguments": {"room": "2"}}</tool_call>'
    for cut in range(1, len(text)):
        parser = ToolCallParser()
        chunks = parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.flush()
        texts = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
        calls = [c for c in chunks if c["type"] == "tool-call"]
        assert texts == "Let me check. ", cut
        assert [(c["toolName"], c["input"]) for c in calls] == [("read", {"room": "2"})], cut


def test_an_unclosed_call_still_counts_and_a_broken_one_stays_text():
    parser = ToolCallParser()  # the closing tag is a stop string: generation ends before it
    chunks = parser.feed('<tool_call>{"name": "read", "arguments": {}}') + parser.flush()
    assert [c["type"] for c in chunks] == ["tool-call"]
    parser = ToolCallParser()
    chunks = parser.feed("a < b and <tool_call>not json") + parser.flush()
    assert "".join(c["delta"] for c in chunks) == "a < b and <tool_call>not json"


def read(room: str) -> float:
    """Read a room's temperature."""
    return 19.5


def test_the_prompt_lists_the_tools_and_shows_calls_and_results_as_text():
    spec = tool_from_function(read).openai_spec()
    assistant = {
        "id": "a1",
        "role": "assistant",
        "parts": [
            {"type": "tool", "toolCallId": "c1", "toolName": "read", "state": "output-available",
             "input": {"room": "2"}, "output": 19.5},
            {"type": "text", "text": "19.5 °C"},
        ],
    }  # fmt: skip
    chat = prompt_messages([user("u1", "temp?"), assistant], "Be brief.", [spec])
    assert chat[0]["role"] == "system" and chat[0]["content"].startswith("Be brief.")
    assert '"name": "read"' in chat[0]["content"] and "<tool_call>" in chat[0]["content"]
    assert chat[1:] == [
        {"role": "user", "content": "temp?"},
        {"role": "assistant", "content": '<tool_call>{"name": "read", "arguments": {"room": "2"}}</tool_call>'},
        {"role": "user", "content": "<tool_result>19.5</tool_result>"},
        {"role": "assistant", "content": "19.5 °C"},
    ]  # fmt: skip


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None


class ScriptedGenerator:
    """A double of engine.generate.Generator (the model), answering fixed texts in pieces."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.prompts: list[Any] = []
        self.stops: list[Any] = []

    async def generate(self, prompt: Any, **options: Any) -> AsyncIterator[Delta]:
        self.prompts.append(prompt)
        self.stops.append(options["stop"])
        text = self.answers[min(len(self.prompts) - 1, len(self.answers) - 1)]
        for i in range(0, len(text), 5):
            yield Delta(text[i : i + 5])
        yield Delta("", "stop")


class LocalWithTools(ChatAgent):
    backend: ClassVar[Any] = None
    tools = (tool_from_function(read),)


async def test_prompt_based_tool_calls_run_tools_in_a_chat(serve):
    generator = ScriptedGenerator(
        ['<tool_call>{"name": "read", "arguments": {"room": "2"}}', "It is 19.5 °C."]
    )
    LocalWithTools.backend = LocalBackend(generator)
    async with serve({"chat": LocalWithTools}) as served, served.client("chat", "l1") as a:
        await a.send("gw.chat.send", id="r1", messages=[user("u1", "temp?")])
        frames = await a.until_type("gw.chat.done")
        kinds = [f["chunk"]["type"] for f in frames if f["type"] == "gw.chat.chunk"]
        assert kinds == ["start", "tool-call", "tool-result"] + ["text-delta"] * 3 + ["finish"]
        assert generator.stops[0] == ("</tool_call>",)
        assert generator.prompts[1][-1] == {
            "role": "user",
            "content": "<tool_result>19.5</tool_result>",
        }
        stored = (await a.messages())[1]
        assert [p["type"] for p in stored["parts"]] == ["tool", "text"]
        assert stored["parts"][1]["text"] == "It is 19.5 °C."
        assert json.dumps(stored).count("19.5") >= 2
