"""A chat agent in Code Mode with the REAL local model (SmolLM2-135M through engine/generate,
prompt-based tool calls) on the site task: whatever it writes (a `code` call, or only text)
runs safely, the answer completes and is stored, and the gateway stays healthy. The 135M
model is not expected to solve the task (it may; the test does not require it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gatewayd.chat import FencedPrograms
from gatewayd.chat.local import LocalBackend
from tests.chat.conftest import user
from tests.chat.test_code_mode import SiteChat, site_served, targets, tool_parts
from tests.codemode.site import DEVICES, TASK, device_id, expected_rooms, seeded

pytestmark = [pytest.mark.model, pytest.mark.timeout(120)]


SYSTEM = (
    "You run a building's thermostats by writing one JavaScript program and calling the "
    "`code` tool with it, for example:\n"
    '<tool_call>{"name": "code", "arguments": {"code": "async () => { const ids = await '
    'codemode.thermostats_list(); return ids.length; }"}}</tool_call>'
)


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    from engine.generate import Generator
    from engine.generate.build import ensure_model

    generator = Generator(ensure_model("smollm2"), kv_cache_tokens=2048)
    yield generator
    generator.close()


async def test_the_local_model_in_code_mode_runs_safely(serve, smollm2) -> None:
    # A fenced block in its answer is its program (it does not write tool calls reliably).
    SiteChat.backend = FencedPrograms(LocalBackend(smollm2, max_tokens=96))  # type: ignore[assignment]
    SiteChat.max_steps = 2
    SiteChat.system_prompt = SYSTEM
    try:
        async with site_served(serve) as served, served.client("chat", "m1") as a:
            await a.send("gw.chat.send", id="r1", messages=[user("u1", TASK)])
            frames = await a.until_type("gw.chat.done")
            assert frames[-1]["status"] == "complete", frames[-1]
            assert "waiting" not in frames[-1]
            answer = (await a.messages())[-1]
            assert answer["role"] == "assistant" and answer["parts"]
            calls = tool_parts(answer)
            for call in calls:  # a call the model made was run (or refused with a reason)
                assert call["state"] in ("output-available", "output-error"), call
                if call["toolName"] == "code" and call["state"] == "output-available":
                    shown = call["output"]  # the program's result or its error, clearly
                    assert set(shown) <= {"result", "error", "logs"}
                    assert "result" in shown or (isinstance(shown["error"], str) and shown["error"])
            print(f"model's answer: {answer['parts']}")
            after = await targets(served)
            solved = any(
                c["toolName"] == "code" and c.get("output") == {"result": expected_rooms()}
                for c in calls
            )
            print("solved" if solved else "not solved (the 135M model is not expected to)")
            # Whatever ran, it went through the thermostats' own tools: a target moved by
            # the program is one the tools allow (any number), never a lost agent.
            assert set(after) == {device_id(i) for i in range(DEVICES)}
            # The gateway is healthy: the chat answers again, the sandbox runs programs.
            assert SiteChat.code_executor is not None
            healthy = await SiteChat.code_executor.run("async () => 'still fine'")
            assert healthy.ok and healthy.result == "still fine"
            room = (await served.runtime.call("thermostat", "t01", "read"))["room"]
            assert room == seeded(0)[0]
    finally:
        del SiteChat.max_steps, SiteChat.system_prompt  # ChatAgent's again
