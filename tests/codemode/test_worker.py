"""The worker's V8 side in this process: the harness, both ways a notification reaches Python
(mini-racer's one-way callback, and its public `wrap_py_function` where that is missing)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gatewayd.codemode import Limits
from gatewayd.codemode._worker import Worker, _Context
from tests.waiting import wait_until


class Recorder(Worker):
    def __init__(self) -> None:
        super().__init__(asyncio.StreamReader(), -1)
        limits = Limits()
        self._config = {
            "heap_bytes": limits.heap_bytes,
            "max_log_chars": limits.max_log_chars,
            "max_log_lines": limits.max_log_lines,
            "max_result_chars": limits.max_result_chars,
            "max_tool_input_chars": limits.max_tool_input_chars,
        }
        self.sent: list[dict[str, Any]] = []

    def _write(self, data: bytes) -> None:
        self.sent.append(json.loads(data[4:]))


PROGRAM = "console.log('hi'); return (await codemode.add({a: 1, b: 2})) * 10"


@pytest.mark.parametrize("path", ["one-way callback", "public wrap_py_function"])
async def test_a_program_runs_on_either_notification_path(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "public wrap_py_function":
        monkeypatch.setattr(_Context, "one_way_notifications", False)
    worker = Recorder()
    worker._next = asyncio.ensure_future(worker._prepare())
    run = asyncio.ensure_future(worker._execute({"code": PROGRAM, "tools": ["add"]}))
    await wait_until(lambda: any(m["type"] == "call" for m in worker.sent), 10, "the tool call")
    call = next(m for m in worker.sent if m["type"] == "call")
    assert call == {"type": "call", "id": 0, "tool": "add", "input": '{"a":1,"b":2}'}
    assert worker._current is not None
    worker._current.evaluate("__codemode_settle(0, true, '3')")
    await asyncio.wait_for(run, 10)
    kinds = [m["type"] for m in worker.sent]
    assert kinds == ["log", "call", "done", "ready"]
    assert worker.sent[0] == {"type": "log", "level": "log", "text": "hi"}
    assert worker.sent[2]["outcome"] == "ok:30"
    assert worker._next is not None
    await (await worker._next).close()
