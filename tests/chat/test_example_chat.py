"""The example chat agent of the README walkthrough: it asks before it changes the example
thermostat, and goes on after the approval or the denial (real runtime, WebSocket, SQLite)."""

from __future__ import annotations

import pytest

from gatewayd.examples.chat import SiteChat
from gatewayd.examples.thermostat import Thermostat
from tests.chat.conftest import user

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("approved", [True, False])
async def test_the_example_asks_before_it_sets_the_thermostat(serve, approved):
    classes = {"chat": SiteChat, "thermostat": Thermostat}
    async with serve(classes) as served, served.client("chat", "demo") as ws:
        await ws.send("gw.chat.send", id="r1", messages=[user("u1", "Set room 2 to 22.5")])
        done = (await ws.until_type("gw.chat.done"))[-1]
        (waiting,) = done["waiting"]
        assert waiting["toolName"] == "thermostat_room2_set_target"
        await ws.send(
            "gw.chat.tool_approval", id="a1", toolCallId=waiting["toolCallId"], approved=approved
        )
        frames = await ws.until(lambda f: f["type"] == "gw.chat.done" and f["request"] == "a1")
        said = "".join(f["chunk"].get("delta", "") for f in frames if f["type"] == "gw.chat.chunk")
        target = (await served.runtime.get_agent_state("thermostat", "room2"))["target"]
        if approved:
            assert said == "Room 2 is now set to 22.5 °C." and target == 22.5
        else:
            assert said == "OK, I left room 2 as it is." and target == 21.0
        await ws.send("gw.chat.send", id="r2", messages=[*await ws.messages(), user("u2", "hi")])
        frames = await ws.until(lambda f: f["type"] == "gw.chat.done" and f["request"] == "r2")
        assert frames[-1]["status"] == "complete"


async def test_the_readme_walkthrough_runs(serve, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Chat agents") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    classes = {"chat": SiteChat, "thermostat": Thermostat}
    async with serve(classes) as served:
        url = served.url("chat", "demo")
        code = snippet.replace("ws://127.0.0.1:8765/agents/chat/demo", url)
        code = code.replace("asyncio.run(main())", "")
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        await namespace["main"]()
        state = await served.runtime.get_agent_state("thermostat", "room2")
    printed = capsys.readouterr().out
    assert "'delta': 'Room 2 is now set to 22.0 °C.'" in printed
    assert "'type': 'gw.chat.messages'" in printed
    assert state["target"] == 22.0
