"""A Code Mode sandbox worker process: runs one program at a time in a fresh V8 context.

Started by the host (`pool.py`) as `python -I -m gatewayd.codemode._worker`. It reads messages
on stdin and writes them on the file descriptor that was stdout (stdout itself is pointed at
stderr, so nothing V8 or Python prints can corrupt the protocol). Messages (`_wire.py`):

    host -> worker   config {heap_bytes, memory_bytes, max_log_chars, max_log_lines,
                             max_result_chars, max_tool_input_chars}   once, first
                     run {code, tools: [js names]}          one at a time
                     result {id, ok, text}                  the answer to a tool call
    worker -> host   ready {pid}                            after config, and after each run
                     call {id, tool, input}                 `await codemode.<tool>(input)`
                     log {level, text}                      console.*
                     done {outcome}                         "ok:<json>", "error:<message>",
                                                            "limit-<kind>:<message>"

Tool calls and log lines are written as JSON by the harness and passed through as they are;
the host checks every message's shape. The worker enforces what V8 can: the heap limit (V8's hard memory limit), and memory outside
the JS heap (array buffers, wasm) with RLIMIT_DATA. Time limits are the host's: a program stuck
in a loop may block this process entirely, so the host kills it. Each context is prepared before
the run that uses it (so a run does not wait for V8 start-up) and closed right after it.

Imports only the standard library, `py_mini_racer` and `_wire` (never the rest of gatewayd).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

from gatewayd.codemode import _wire

HARNESS_SOURCE = (Path(__file__).parent / "harness.js").read_text()
MAX_INBOUND_BYTES = 64 << 20


def _data_segment_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmData:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _limit_process(memory_bytes: int) -> None:
    """Cap memory outside the V8 heap, and forbid files and core dumps. Called once V8 has
    reserved its address ranges (the first context), so the cap counts what programs add."""
    limit = _data_segment_bytes() + memory_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class _Context:
    """One V8 context with the harness installed, used for exactly one run."""

    one_way_notifications = True  # False: always mini-racer's public wrap_py_function

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._stack = contextlib.AsyncExitStack()
        self.racer: Any = None

    async def open(self, config: dict[str, Any]) -> None:
        from py_mini_racer import mini_racer

        self.racer = self._stack.enter_context(mini_racer(asyncio.get_running_loop()))
        self.racer.set_hard_memory_limit(int(config["heap_bytes"]))
        install = self.racer.eval(HARNESS_SOURCE)
        install(
            await self._notification(),
            int(config["max_log_chars"]),
            int(config["max_log_lines"]),
            int(config["max_result_chars"]),
            int(config["max_tool_input_chars"]),
        )

    async def _notification(self) -> Any:
        """A JS function `notify(text)` that hands `text` to the worker.

        mini-racer's public `wrap_py_function` costs about ten calls into V8 per notification
        (it makes and resolves a promise for each); its one-way notification, which the public
        one is built on, costs one. Used when present (mini-racer 0.14), else the public one."""
        context = self.racer._ctx
        register = getattr(context, "_register_js_notification", None)
        to_python = getattr(context, "_value_handle_to_python", None)
        if self.one_way_notifications and register is not None and to_python is not None:

            def on_raw(handle: Any) -> None:
                self._worker.on_notify(str(to_python(handle)[0]))

            return self._stack.enter_context(register(on_raw))

        async def on_call(text: Any) -> None:
            self._worker.on_notify(str(text))

        return await self._stack.enter_async_context(self.racer.wrap_py_function(on_call))

    def evaluate(self, expression: str) -> str | None:
        """Evaluate `expression`; None, or the outcome when V8 stopped it (a limit)."""
        try:
            self.racer.eval(expression)
        except Exception as exc:  # py_mini_racer's JSOOMException, JSEvalException, ...
            return _describe_failure(exc, self)
        return None

    async def close(self) -> None:
        await self._stack.aclose()


class Worker:
    def __init__(self, reader: asyncio.StreamReader, out_fd: int) -> None:
        self._reader = reader
        self._out_fd = out_fd
        self._config: dict[str, Any] = {}
        self._next: asyncio.Task[_Context] | None = None
        self._current: _Context | None = None
        self._done: asyncio.Future[str] | None = None
        self._run: asyncio.Task[None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        self._write(_wire.encode(message))

    def send_raw(self, body: bytes) -> None:
        """Send a message the harness already wrote as JSON (the host checks every message)."""
        self._write(_wire.HEADER.pack(len(body)) + body)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # blocking writes: the host always reads, and order must be kept
            written = os.write(self._out_fd, view)
            view = view[written:]

    def on_notify(self, text: str) -> None:
        if self._done is None or self._done.done():
            return  # after its outcome a program may not speak (a late timer's log, say)
        kind, _, payload = text.partition("\n")
        if kind == "send":
            self.send_raw(payload.encode())
        elif kind == "done":
            self._finish(payload)

    def _finish(self, outcome: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(outcome)

    async def _prepare(self) -> _Context:
        context = _Context(self)
        await context.open(self._config)
        return context

    async def serve(self) -> None:
        while True:
            message = await _wire.read_message(self._reader, MAX_INBOUND_BYTES)
            if message is None:
                return
            kind = message["type"]
            if kind == "config":
                self._config = message
                first = await self._prepare()  # reserves V8's ranges before the data cap
                _limit_process(int(message["memory_bytes"]))
                self._next = asyncio.get_running_loop().create_task(asyncio.sleep(0, first))
                self.send({"type": "ready", "pid": os.getpid()})
            elif kind == "run":
                self._run = asyncio.get_running_loop().create_task(self._execute(message))
            elif kind == "result" and self._current is not None:
                args = f"{int(message['id'])},{'true' if message['ok'] else 'false'}"
                stopped = self._current.evaluate(
                    f"__codemode_settle({args},{json.dumps(str(message['text']))})"
                )
                if stopped is not None:
                    self._finish(stopped)

    async def _execute(self, message: dict[str, Any]) -> None:
        assert self._next is not None
        context = self._current = await self._next
        self._done = asyncio.get_running_loop().create_future()
        tools = json.dumps([str(name) for name in message["tools"]])
        stopped = context.evaluate(f"__codemode_start({tools},{json.dumps(str(message['code']))})")
        if stopped is not None:
            self._finish(stopped)
        outcome = await self._done
        self._current = None
        self.send({"type": "done", "outcome": outcome})
        with contextlib.suppress(Exception):
            await context.close()
        self._next = asyncio.get_running_loop().create_task(self._prepare())
        await self._next
        self.send({"type": "ready", "pid": os.getpid()})


def _describe_failure(exc: Exception, context: _Context) -> str:
    from py_mini_racer import JSOOMException

    if isinstance(exc, JSOOMException) or context.racer.was_hard_memory_limit_reached():
        return "limit-heap:the program used more than its JavaScript heap limit"
    return f"error:{type(exc).__name__}: {exc}"


async def _main() -> None:
    out_fd = os.dup(1)  # the protocol's channel; stdout itself becomes stderr
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_INBOUND_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await Worker(reader, out_fd).serve()


if __name__ == "__main__":
    asyncio.run(_main())
