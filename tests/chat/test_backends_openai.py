"""`OpenAICompatibleBackend` against a tiny real HTTP server that speaks the OpenAI streaming
shape (server-sent events), through the official `openai` client, then through a ChatAgent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("openai")

from gatewayd.chat import ChatAgent, OpenAICompatibleBackend
from gatewayd.chat.backends import to_openai_messages
from tests.chat.conftest import user

pytestmark = pytest.mark.timeout(60)


def sse_event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "tiny",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class FakeOpenAI:
    """One scripted streaming completion per request; records the request bodies."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.requests: list[dict[str, Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":")[1])
        self.requests.append(json.loads(await reader.readexactly(length)))
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        )
        for event in self.events:
            writer.write(event)
            await writer.drain()
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.close()
            await server.wait_closed()


TEXT_EVENTS = [
    sse_event({"role": "assistant", "content": ""}),
    sse_event({"content": "Room 2 "}),
    sse_event({"content": "is at 21 °C."}),
    sse_event({}, finish="stop"),
]


async def test_text_streams_as_text_deltas():
    fake = FakeOpenAI(TEXT_EVENTS)
    async with fake.serving() as base_url:
        backend = OpenAICompatibleBackend(base_url=base_url, model="tiny", max_retries=0)
        chunks = [c async for c in backend.stream([user("u1", "temp?")], system="Be brief.")]
    assert [c["type"] for c in chunks] == ["start", "text-delta", "text-delta", "finish"]
    assert "".join(c.get("delta", "") for c in chunks) == "Room 2 is at 21 °C."
    assert chunks[-1]["metadata"] == {"finishReason": "stop"}
    assert fake.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "temp?"},
    ]
    assert fake.requests[0]["stream"] is True


async def test_native_tool_calls_become_tool_call_chunks(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-test\n")
    fake = FakeOpenAI(
        [
            sse_event(
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "set_target", "arguments": ""},
                        }
                    ],
                }
            ),
            sse_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"room": 2, '}}]}),
            sse_event({"tool_calls": [{"index": 0, "function": {"arguments": '"celsius": 21}'}}]}),
            sse_event({}, finish="tool_calls"),
        ]
    )
    tools = [
        {"type": "function", "function": {"name": "set_target", "parameters": {"type": "object"}}}
    ]
    async with fake.serving() as base_url:
        backend = OpenAICompatibleBackend(
            base_url=base_url, model="tiny", api_key_file=key_file, max_retries=0
        )
        chunks = [c async for c in backend.stream([user("u1", "heat room 2")], tools=tools)]
    call = next(c for c in chunks if c["type"] == "tool-call")
    assert call == {
        "type": "tool-call",
        "toolCallId": "call_1",
        "toolName": "set_target",
        "input": {"room": 2, "celsius": 21},
    }
    assert fake.requests[0]["tools"] == tools


def test_tool_parts_become_calls_followed_by_results():
    messages = [
        user("u1", "heat"),
        {
            "id": "a1",
            "role": "assistant",
            "parts": [
                {
                    "type": "tool",
                    "toolCallId": "c1",
                    "toolName": "heat",
                    "state": "output-available",
                    "input": {"r": 2},
                    "output": {"ok": True},
                },
                {
                    "type": "tool",
                    "toolCallId": "c2",
                    "toolName": "cool",
                    "state": "output-error",
                    "input": {},
                    "errorText": "denied",
                },
            ],
        },
    ]
    out = to_openai_messages(messages, None)
    assert out[1]["tool_calls"][0]["function"] == {"name": "heat", "arguments": '{"r": 2}'}
    assert out[2] == {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'}
    assert out[3] == {"role": "tool", "tool_call_id": "c2", "content": '{"error": "denied"}'}


async def test_a_chat_agent_answers_through_an_openai_compatible_server(serve):
    fake = FakeOpenAI(TEXT_EVENTS)
    async with fake.serving() as base_url:

        class Assistant(ChatAgent):
            system_prompt = "You run the heating."
            backend = OpenAICompatibleBackend(base_url=base_url, model="tiny", max_retries=0)

        async with serve({"assistant": Assistant}) as served, served.client("assistant", "a") as c:
            await c.send("gw.chat.send", id="r1", messages=[user("u1", "temp?")])
            assert (await c.until_type("gw.chat.done"))[-1]["status"] == "complete"
            answer = (await c.messages())[1]
    assert answer["parts"] == [{"type": "text", "text": "Room 2 is at 21 °C."}]
    assert answer["metadata"] == {"finishReason": "stop"}
    assert fake.requests[0]["messages"][0] == {"role": "system", "content": "You run the heating."}
