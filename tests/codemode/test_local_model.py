"""The real local model (SmolLM2-135M) writes the site task's program; whatever it writes
runs in the sandbox safely: an answer or a clear error, and the executor stays healthy. The
135M model is not expected to solve the task (it may; the test does not require it)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.codemode import CodeExecutor, code_tool
from tests.codemode.site import TASK, expected_rooms, site

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

_FENCED = re.compile(r"```(?:js|javascript|ts|typescript)?\s*\n(.*?)(?:```|$)", re.S)


def program_in(answer: str) -> str:
    """The program in a model's answer: its first fenced block, else the whole answer."""
    match = _FENCED.search(answer)
    return (match.group(1) if match else answer).strip() or "return null"


@pytest.fixture(scope="module")
def generator() -> Iterator[object]:
    from engine.generate import Generator
    from engine.generate.build import ensure_model

    model = Generator(ensure_model("smollm2"), kv_cache_tokens=2048)
    yield model
    model.close()


async def test_the_local_model_writes_a_program_that_runs_safely(
    generator: object, executor: CodeExecutor, tmp_path: Path
) -> None:
    from engine.generate import Generator

    assert isinstance(generator, Generator)
    async with site(tmp_path) as the_site:
        code = code_tool(executor, the_site.tools)
        messages = [
            {"role": "system", "content": code.description + "\nReply with the program only."},
            {"role": "user", "content": TASK},
        ]
        deltas = [d async for d in generator.generate(messages, max_tokens=120)]
        answer = "".join(d.text for d in deltas)
        shown = await code.invoke({"code": program_in(answer)})
        targets = await the_site.targets()
    print(f"model wrote:\n{answer}\nsandbox answered: {shown}")
    assert set(shown) <= {"result", "error", "logs"} and ("result" in shown or "error" in shown)
    if "error" in shown:
        assert isinstance(shown["error"], str) and shown["error"]
    solved = shown.get("result") == expected_rooms()
    print("solved" if solved else "not solved (the 135M model is not expected to)")
    assert len(targets) == 50
    healthy = await executor.run("return 'still fine'")
    assert healthy.ok and healthy.result == "still fine"
