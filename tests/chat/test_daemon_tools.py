"""Tools through the real daemon: an approval asked before a SIGKILL is answered after the
restart and the chat goes on; the stored history over the HTTP API; a chat agent whose
backend comes from the TOML config. Real processes, sockets, SQLite and WebSocket clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.brokers import free_port
from tests.chat.conftest import ChatClient, user
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.notify import NotifySocket

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[gateway]
state_dir = "state"
[http]
bind = "127.0.0.1:0"
[api]
enabled = true
bind = "127.0.0.1:{api_port}"
tokens_file = "tokens.toml"
[agents]
python_path = ["{repo}", "{modules}"]
[agents.classes.site]
class = "site_agents:Site"
[agents.classes.plain]
class = "site_agents:Plain"
[agents.classes.thermostat]
class = "gatewayd.examples.thermostat:Thermostat"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
[mqtt]
enabled = false
[chat.backends.canned]
kind = "scripted"
reply = "Configured in TOML."
[chat.agents.plain]
backend = "canned"
system_prompt = "You are configured."
"""

TOKENS = """
[tokens.ops]
token = "ops-secret-0123456789"
scopes = ["messages"]
[tokens.other]
token = "other-secret-0123456789"
scopes = ["messages"]
classes = ["thermostat"]
"""

AGENTS = """
import os
from gatewayd.chat import ChatAgent
from gatewayd.tools import tool


class ValveModel:
    '''A double of the model that answers from what it is given (the daemon restarts).'''

    async def stream(self, messages, *, system=None, tools=None):
        parts = messages[-1]["parts"] if messages[-1]["role"] == "assistant" else []
        if any(p.get("state") == "output-available" for p in parts):
            yield {"type": "text-delta", "id": "t0", "delta": "Valve 3 is open."}
        else:
            yield {"type": "tool-call", "toolCallId": "c1", "toolName": "open_valve",
                   "input": {"valve": 3}}


class Site(ChatAgent):
    backend = ValveModel()

    @tool(needs_approval=True)
    def open_valve(self, valve: int) -> str:
        '''Open a water valve.'''
        with open(os.environ["VALVE_LOG"], "a") as log:
            log.write(f"open {valve}\\n")
        return f"valve {valve} open"


class Plain(ChatAgent):
    pass
"""


@asynccontextmanager
async def chat_client(url: str) -> AsyncIterator[ChatClient]:
    async with connect(url) as ws:
        client = ChatClient(ws)
        assert (await client.next_frame())["type"] == "gw.identity"
        assert (await client.next_frame())["type"] == "gw.state"
        yield client


async def test_an_approval_survives_sigkill_and_the_history_is_served_over_http(
    tmp_path: Path, notify: NotifySocket
) -> None:
    (tmp_path / "site_agents.py").write_text(AGENTS)
    (tmp_path / "tokens.toml").write_text(TOKENS)
    ws_port, api_port = free_port(), free_port()
    config = tmp_path / "gatewayd.toml"
    config.write_text(
        CONFIG.format(repo=REPO, modules=tmp_path, ws_port=ws_port, api_port=api_port)
    )
    valve_log = tmp_path / "valves.log"
    daemon = GatewayProcess(config, notify, VALVE_LOG=str(valve_log))
    url = f"ws://127.0.0.1:{ws_port}/agents/site/s1"
    daemon.start()
    try:
        async with chat_client(url) as client:
            await client.send("gw.chat.send", id="r1", messages=[user("u1", "open valve 3")])
            done = (await client.until_type("gw.chat.done"))[-1]
            assert done["waiting"] == [
                {"toolCallId": "c1", "toolName": "open_valve", "kind": "approval"}
            ]
        daemon.kill()  # no drain: the approval request must already be durable
        assert not valve_log.exists()
        daemon.start()
        async with chat_client(url) as client:
            waiting = (await client.messages())[1]["parts"][0]
            assert waiting["state"] == "approval-requested"
            await client.send("gw.chat.tool_approval", id="a1", toolCallId="c1", approved=True)
            frames = await client.until_type("gw.chat.done")
            assert frames[-1]["status"] == "complete" and frames[-1]["request"] == "a1"
        assert valve_log.read_text() == "open 3\n"  # run once, after the approval

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as http:
            ops = {"Authorization": "Bearer ops-secret-0123456789"}
            answer = await http.get("/agents/site/s1/messages", headers=ops)
            assert answer.status_code == 200
            messages = answer.json()["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"]
            parts = messages[1]["parts"]
            assert parts[0]["state"] == "output-available"
            assert parts[0]["output"] == "valve 3 open"
            assert parts[1] == {"type": "text", "text": "Valve 3 is open."}
            last = await http.get("/agents/site/s1/messages?limit=1", headers=ops)
            assert last.json()["messages"] == messages[1:]
            other = {"Authorization": "Bearer other-secret-0123456789"}
            refused = await http.get("/agents/site/s1/messages", headers=other)
            assert refused.status_code == 403 and "site" in refused.json()["error"]["message"]
            assert (await http.get("/agents/site/s1/messages")).status_code == 401
            not_chat = await http.get("/agents/thermostat/t1/messages", headers=ops)
            assert not_chat.status_code == 404
            assert "not a chat agent" in not_chat.json()["error"]["message"]
            bad = await http.get("/agents/site/s1/messages?limit=-1", headers=ops)
            assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]

        async with chat_client(f"ws://127.0.0.1:{ws_port}/agents/plain/p1") as client:
            await client.send("gw.chat.send", id="r1", messages=[user("u1", "hi")])
            frames = await client.until_type("gw.chat.done")
            texts = [f["chunk"].get("delta") for f in frames if f["type"] == "gw.chat.chunk"]
            assert "Configured in TOML." in texts
    finally:
        assert daemon.stop() == 0
    assert json.loads(json.dumps(messages))  # (the history was JSON all the way)
