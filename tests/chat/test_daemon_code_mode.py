"""Code Mode in the real daemon: its one executor (limits from `[codemode]`) runs a chat
agent's programs; a program past the wall-clock limit is an error the model is told, and the
next program runs; the sandbox workers end with the daemon. `code_mode` from the TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.chat import ChatAgent
from gatewayd.chat.config import configure_chat_classes
from gatewayd.codemode import Limits
from gatewayd.config import parse_config
from gatewayd.wiring import codemode_limits
from tests.brokers import free_port
from tests.chat.conftest import user
from tests.chat.test_daemon_tools import chat_client
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.notify import NotifySocket
from tests.processes import command_line, descendants, running

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[gateway]
state_dir = "state"
[http]
bind = "127.0.0.1:0"
[agents]
python_path = ["{repo}", "{modules}"]
[agents.classes.site]
class = "code_agents:Site"
[listeners.websocket]
bind = "127.0.0.1:{ws_port}"
[mqtt]
enabled = false
[codemode]
workers = 1
wall_time = "2s"
"""

AGENTS = """
from gatewayd.chat import ChatAgent
from gatewayd.tools import tool

PROGRAMS = {
    "count": "async () => { await codemode.bump({by: 2}); return await codemode.bump({by: 3}); }",
    "spin": "async () => { while (true) {} }",
}


class ProgramModel:
    '''A double of the model: writes the program the user names, then says what it gave.'''

    async def stream(self, messages, *, system=None, tools=None):
        last = messages[-1]
        if last["role"] == "user":
            program = PROGRAMS[last["parts"][0]["text"]]
            yield {"type": "tool-call", "toolCallId": "c1", "toolName": "code",
                   "input": {"code": program}}
        else:
            part = last["parts"][0]
            told = part.get("output") if part["state"] == "output-available" else part
            yield {"type": "text-delta", "id": "t0", "delta": repr(told)}


class Site(ChatAgent):
    backend = ProgramModel()
    code_mode = True
    initial_state = {"count": 0}

    @tool
    def bump(self, by: int) -> int:
        '''Add `by` to the count; the new count.'''
        self.set_state({"count": self.state["count"] + by})
        return self.state["count"]
"""

WORKER = "gatewayd.codemode._worker"


async def ask(url: str, text: str, request_id: str) -> dict:
    async with chat_client(url) as client:
        await client.send("gw.chat.send", id=request_id, messages=[user(request_id, text)])
        frames = await client.until_type("gw.chat.done")
        assert frames[-1]["status"] == "complete"
        return (await client.messages())[-1]["parts"][0]


async def test_the_daemons_executor_runs_programs_within_its_limits(
    tmp_path: Path, notify: NotifySocket
) -> None:
    (tmp_path / "code_agents.py").write_text(AGENTS)
    ws_port = free_port()
    config = tmp_path / "gatewayd.toml"
    config.write_text(CONFIG.format(repo=REPO, modules=tmp_path, ws_port=ws_port))
    daemon = GatewayProcess(config, notify)
    url = f"ws://127.0.0.1:{ws_port}/agents/site/s1"
    daemon.start()
    try:
        counted = await ask(url, "count", "r1")
        assert counted["toolName"] == "code" and counted["output"] == {"result": 5}
        workers = [p for p in descendants() if WORKER in command_line(p)]
        assert len(workers) == 1  # [codemode] workers = 1
        spun = await ask(url, "spin", "r2")
        assert spun["state"] == "output-available"  # the program's error, told to the model
        assert "wall" in spun["output"]["error"] and "2" in spun["output"]["error"]
        again = await ask(url, "count", "r3")
        assert again["output"] == {"result": 10}  # the gateway and the agent's state go on
        workers = [p for p in descendants() if WORKER in command_line(p)]
    finally:
        assert daemon.stop() == 0
    assert not [p for p in workers if running(p)]  # closed with the daemon


def test_code_mode_from_the_toml_and_the_limits_from_codemode() -> None:
    class Plain(ChatAgent):
        pass

    config = parse_config(
        {
            "agents": {"classes": {"plain": {"class": "gatewayd.chat:ChatAgent"}}},
            "chat": {
                "backends": {"b": {"kind": "echo"}},
                "agents": {"plain": {"backend": "b", "code_mode": True}},
            },
            "codemode": {"wall_time": "5s", "heap_size": "32MiB", "max_tool_calls": 50},
        }
    )
    made: list[object] = []

    def executor() -> object:
        made.append(object())
        return made[-1]

    classes = configure_chat_classes({"plain": Plain}, config.chat, {}, executor)
    assert classes["plain"].code_mode is True  # type: ignore[attr-defined]
    assert classes["plain"].code_executor is made[0]  # type: ignore[attr-defined]
    assert Plain.code_mode is False and Plain.code_executor is None
    untouched = configure_chat_classes({"plain": Plain}, None, {}, executor)
    assert untouched["plain"] is Plain and len(made) == 1  # no Code Mode: no executor
    limits = codemode_limits(config)
    assert (limits.wall_time_s, limits.heap_bytes, limits.max_tool_calls) == (5.0, 32 << 20, 50)
    assert codemode_limits(parse_config({})) == Limits()
