"""`ChatClient` against the real runtime and WebSocket listener: a client whose connection
drops mid-answer (the listener restarts) reconnects, resumes by itself and gets every chunk
exactly once, in order; a second client sees the same answer; the conversation is stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.chat import ChatAgent, ScriptedBackend
from gatewayd.client import ChatClient, ChatResponse
from protocols.ws import WsListener, WsSettings
from tests.brokers import free_port
from tests.waiting import wait_until

WAIT_S = 10.0


def words(n: int) -> list[dict[str, Any]]:
    return [{"type": "text-delta", "id": "t", "delta": f"w{i} "} for i in range(n)]


class Scripted(ChatAgent):
    backend: ClassVar[ScriptedBackend] = ScriptedBackend([])


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[AgentRuntime]:
    runtime = AgentRuntime(AgentSettings(state_dir=tmp_path / "state"), {"chat": Scripted})
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


async def test_a_dropped_connection_resumes_the_answer_with_every_chunk_once(
    runtime: AgentRuntime,
) -> None:
    gates = {3: asyncio.Event(), 6: asyncio.Event()}
    Scripted.backend = ScriptedBackend([{"type": "start"}, *words(8), {"type": "finish"}], gates)
    settings = WsSettings(port=free_port())
    listener = WsListener(settings, runtime)
    await listener.start()
    url = f"ws://127.0.0.1:{settings.port}"
    try:
        async with (
            ChatClient(url, "chat", "c1", backoff_min_s=0.05, backoff_max_s=0.2) as chat,
            ChatClient(url, "chat", "c1", reconnect=False) as other,
        ):
            seen_by_other: list[ChatResponse] = []
            other.on_response(seen_by_other.append)
            answer = await chat.send("hello")
            await wait_until(lambda: len(answer.chunks) == 3, WAIT_S, "the first 3 chunks")

            await listener.stop()  # every connection drops (1001), as in a restart
            gates[3].set()  # chunks 3..5 are made while the client is away
            listener = WsListener(settings, runtime)
            await listener.start()
            await chat.wait_connected(WAIT_S)
            assert chat.connects == 2
            gates[6].set()

            async with asyncio.timeout(WAIT_S):
                assert await answer.wait() == "complete"
            assert [c["type"] for c in answer.chunks] == ["start"] + ["text-delta"] * 8 + ["finish"]
            assert answer.text == "".join(f"w{i} " for i in range(8))
            assert answer.last_seq == 9  # seq 0..9, each once: replayed ones were skipped

            # The second client saw the answer start before it was dropped for good.
            assert seen_by_other and seen_by_other[0].request == answer.request

            await wait_until(lambda: len(chat.messages) == 2, WAIT_S, "the stored answer")
            assert chat.messages[0]["parts"][0]["text"] == "hello"
            assert chat.messages[1]["role"] == "assistant"
            assert chat.messages[1]["parts"][0]["text"].strip() == answer.text.strip()
            assert await chat.resume() is None  # nothing streams any more
    finally:
        await listener.stop()
