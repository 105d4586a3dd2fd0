"""SIGKILL (and SIGTERM) mid-stream through the real daemon: after a restart the partial answer is stored
(and was never shown to a client without being durable first) and a new message works.

The model is an OpenAI-compatible server in the test process that stops mid-answer on the
first request (the daemon's backend waits on it, as on a slow model) and answers in full after.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.brokers import free_port
from tests.chat.conftest import ChatClient, user
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.notify import NotifySocket

pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[gateway]
state_dir = "state"
[http]
bind = "127.0.0.1:0"
[agents]
python_path = ["{repo}", "{modules}"]
[agents.classes.assistant]
class = "chat_agents:Assistant"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
[mqtt]
enabled = false
"""

AGENTS = """
import os
from gatewayd.chat import ChatAgent, OpenAICompatibleBackend

class Assistant(ChatAgent):
    stream_flush_s = 0  # stored before sent: what a client saw survives a SIGKILL
    backend = OpenAICompatibleBackend(
        base_url=os.environ["CHAT_MODEL_URL"], model="tiny", max_retries=0, timeout_s=600
    )
"""


def sse(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class StallingModel:
    """First request: two words, then silence. Later ones: a whole answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.never = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(":")[1])
            for line in head.decode().split("\r\n")
            if line.lower().startswith("content-length:")
        )
        self.requests.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        if len(self.requests) == 1:
            writer.write(sse("Room 2 ") + sse("is at "))
            await writer.drain()
            await self.never.wait()  # the daemon is killed meanwhile
            return
        writer.write(sse("Still here.") + sse(None, "stop") + b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        finally:
            self.never.set()
            server.close()


@asynccontextmanager
async def chat_client(url: str) -> AsyncIterator[ChatClient]:
    async with connect(url) as ws:
        client = ChatClient(ws)
        assert (await client.next_frame())["type"] == "gw.identity"
        assert (await client.next_frame())["type"] == "gw.state"
        yield client


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
async def test_a_stop_mid_stream_keeps_the_partial_answer_and_the_chat_goes_on(
    tmp_path: Path, notify: NotifySocket, stop: str
) -> None:
    """SIGKILL: recovered on the next wake from the stored chunks. SIGTERM: the drain ends
    the stream itself ("interrupted") before the runtime closes."""
    (tmp_path / "chat_agents.py").write_text(AGENTS)
    ws_port = free_port()
    config = tmp_path / "gatewayd.toml"
    config.write_text(CONFIG.format(repo=REPO, modules=tmp_path, ws_port=ws_port))
    model = StallingModel()
    url = f"ws://127.0.0.1:{ws_port}/agents/assistant/a1"
    async with model.serving() as model_url:
        daemon = GatewayProcess(config, notify, CHAT_MODEL_URL=model_url)
        daemon.start()
        try:
            async with chat_client(url) as client:
                await client.send("gw.chat.send", id="r1", messages=[user("u1", "temp?")])
                seen = await client.until(lambda f: f.get("chunk", {}).get("delta") == "is at ")
                if stop == "SIGKILL":
                    daemon.kill()  # no drain, no goodbye
                else:
                    # From a thread: this loop stays free to answer the daemon's close of the
                    # connection, as a client does (blocked, it made the drain wait its 10 s).
                    assert await asyncio.to_thread(daemon.stop) == 0
                    assert "left to recovery" not in daemon.log_text()
            assert [f["chunk"]["type"] for f in seen if f["type"] == "gw.chat.chunk"] == [
                "start",
                "text-delta",
                "text-delta",
            ]
            daemon.start()
            async with chat_client(url) as client:
                await client.send("gw.chat.resume")
                assert await client.next_frame() == {"type": "gw.chat.resume_none"}
                messages = await client.messages()
                assert [m["role"] for m in messages] == ["user", "assistant"]
                assert messages[1]["parts"] == [{"type": "text", "text": "Room 2 is at "}]
                assert messages[1]["metadata"] == {"streamStatus": "interrupted"}
                await client.send(
                    "gw.chat.send", id="r2", messages=[*messages, user("u2", "hello?")]
                )
                assert (await client.until_type("gw.chat.done"))[-1]["status"] == "complete"
                after = await client.messages()
                assert [m["id"] for m in after[:3]] == [m["id"] for m in messages] + ["u2"]
                assert after[3]["parts"] == [{"type": "text", "text": "Still here."}]
            # The model saw the partial answer as context on the second request.
            assert model.requests[1]["messages"][1] == {
                "role": "assistant",
                "content": "Room 2 is at ",
            }
        finally:
            daemon.stop()
