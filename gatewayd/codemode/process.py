"""One sandbox worker process, seen from the host: spawn, run one program, kill.

The host owns every time limit: a program stuck in a loop can block the worker's own event
loop, so the wall-clock deadline is enforced here and the CPU time is read from /proc while
the program runs. Past either, the worker is killed (SIGKILL) and the pool replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewayd.codemode import _wire
from gatewayd.codemode.clock import RunClock
from gatewayd.codemode.limits import CodeModeError, Limits

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0
CPU_POLL_S = 0.05
STDERR_TAIL_BYTES = 2000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Fixed headroom for a message's envelope beyond the text limits it carries.
_WIRE_SLACK_BYTES = 64 * 1024

# A JS error whose message says V8 refused memory: the program met `memory_bytes`.
_MEMORY_ERRORS = (
    "Array buffer allocation failed",
    "Unable to grow instance memory",
    "Out of memory",
)
_STACK_ERRORS = ("Maximum call stack size exceeded",)


@dataclass
class LogLine:
    level: str  # log, info, warn, error, debug
    text: str


@dataclass
class Outcome:
    """How one run ended, before the result is decoded."""

    ok: bool
    result_json: str = ""  # "" when the program returned undefined
    error: str | None = None
    limit: str | None = None  # wall_time, cpu_time, heap, memory, stack, result, tool_calls, ...
    logs: list[LogLine] = field(default_factory=list)
    tool_calls: int = 0
    messages: int = 0  # how many the worker sent in this run (0: it never saw the program)

    @property
    def worker_must_go(self) -> bool:
        return self.limit is not None


# Answers one tool call: (js name, input JSON text, the run's clock) -> (ok, JSON or message).
CallHandler = Callable[[str, str, RunClock], Awaitable[tuple[bool, str]]]


def _worker_env() -> dict[str, str]:
    # Capabilities, not credentials: the worker gets none of the daemon's environment.
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime


_FIELDS: dict[str, dict[str, type]] = {
    "log": {"level": str, "text": str},
    "call": {"id": int, "tool": str, "input": str},
    "done": {"outcome": str},
}


def _well_formed(message: dict[str, Any]) -> bool:
    fields = _FIELDS.get(message["type"])
    return fields is not None and all(
        isinstance(message.get(name), kind) for name, kind in fields.items()
    )


class WorkerProcess:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._proc: asyncio.subprocess.Process | None = None
        self._inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._ready = asyncio.Event()
        self._stderr: deque[bytes] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._hung_up = False  # its end of the pipe closed: dead or dying
        self._max_inbound = (
            max(limits.max_result_chars, limits.max_log_chars, limits.max_tool_input_chars) * 8
            + _WIRE_SLACK_BYTES
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not self._hung_up

    async def start(self) -> None:
        """Start the process and wait until its first context is ready. Raises CodeModeError;
        on any failure or cancellation the process is killed, never left behind."""
        try:
            await self._start()
        except BaseException as exc:
            await self.kill()
            if isinstance(exc, TimeoutError | CodeModeError):
                raise CodeModeError(
                    f"a Code Mode worker did not start: {exc}{self._tail()}"
                ) from exc
            raise

    async def _start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-m", "gatewayd.codemode._worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=_worker_env(), start_new_session=True,
            limit=self._max_inbound + _wire.HEADER.size,
        )  # fmt: skip
        self._tasks = [
            asyncio.create_task(self._read_messages(), name=f"codemode-worker-{self.pid}"),
            asyncio.create_task(self._read_stderr(), name=f"codemode-stderr-{self.pid}"),
        ]
        limits = self.limits
        self._send({
            "type": "config", "heap_bytes": limits.heap_bytes, "memory_bytes": limits.memory_bytes,
            "max_log_chars": limits.max_log_chars, "max_log_lines": limits.max_log_lines,
            "max_result_chars": limits.max_result_chars,
            "max_tool_input_chars": limits.max_tool_input_chars,
        })  # fmt: skip
        await asyncio.wait_for(self.wait_ready(), START_TIMEOUT_S)

    async def wait_ready(self) -> None:
        """Until the worker has a fresh context prepared. Raises CodeModeError if it died."""
        waiter = asyncio.create_task(self._ready.wait())
        assert self._proc is not None
        died = asyncio.create_task(self._proc.wait())
        try:
            await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            died.cancel()
        if not self._ready.is_set():
            raise CodeModeError(f"the worker exited ({self._exit_description()})")

    async def run(self, code: str, tools: list[str], on_call: CallHandler) -> Outcome:
        """Run `code` with `tools` (JS names) bound; tool calls are answered by `on_call`."""
        assert self._proc is not None
        self._ready.clear()
        while not self._inbox.empty():  # nothing from an earlier run may reach this one
            if self._inbox.get_nowait() is None:
                self._inbox.put_nowait(None)
                break
        outcome = Outcome(ok=False)
        calls: set[asyncio.Task[None]] = set()
        gate = asyncio.Semaphore(self.limits.max_concurrent_tool_calls)
        clock = RunClock(self.limits.wall_time_s)
        watches = [
            asyncio.create_task(self._watch_cpu(), name="cpu_time"),
            asyncio.create_task(clock.expired(CPU_POLL_S), name="wall_time"),
        ]
        self._send({"type": "run", "code": code, "tools": tools})
        try:
            await self._converse(outcome, calls, gate, lambda n, i: on_call(n, i, clock), watches)
        finally:
            for task in [*watches, *calls]:
                task.cancel()
        if outcome.worker_must_go:
            await self.kill()
        return outcome

    async def _converse(
        self,
        outcome: Outcome,
        calls: set[asyncio.Task[None]],
        gate: asyncio.Semaphore,
        on_call: Callable[[str, str], Awaitable[tuple[bool, str]]],
        watches: list[asyncio.Task[None]],
    ) -> None:
        inbox_get: asyncio.Task[dict[str, Any] | None] | None = None
        try:
            while True:
                inbox_get = asyncio.create_task(self._inbox.get())
                await asyncio.wait({inbox_get, *watches}, return_when=asyncio.FIRST_COMPLETED)
                if not inbox_get.done():
                    self._fail_on_watch(outcome, watches)
                    return
                message = inbox_get.result()
                if message is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._reaped(), 1.0)
                    self._fail(outcome, "worker_died", "the sandbox worker died "
                               f"({self._exit_description()}){self._tail()}")  # fmt: skip
                    return
                outcome.messages += 1
                kind = message["type"]
                if not _well_formed(message):
                    self._fail(outcome, "protocol", f"the sandbox worker sent a malformed "
                               f"{kind!r} message")  # fmt: skip
                    return
                if kind == "log":
                    outcome.logs.append(LogLine(str(message["level"]), str(message["text"])))
                elif kind == "call":
                    outcome.tool_calls += 1
                    if outcome.tool_calls > self.limits.max_tool_calls:
                        self._fail(outcome, "tool_calls", "the program made more than "
                                   f"{self.limits.max_tool_calls} tool calls and was stopped")  # fmt: skip
                        return
                    task = asyncio.create_task(self._answer(message, gate, on_call))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                elif kind == "done":
                    self._decode(outcome, str(message["outcome"]))
                    return
        finally:
            if inbox_get is not None and not inbox_get.done():
                inbox_get.cancel()

    def _fail_on_watch(self, outcome: Outcome, watches: list[asyncio.Task[None]]) -> None:
        if watches[0].done():
            self._fail(outcome, "cpu_time", "the program used more than its CPU time limit of "
                       f"{self.limits.cpu_time_s:g} s and was stopped")  # fmt: skip
        else:
            self._fail(outcome, "wall_time", "the program ran past its wall-clock limit of "
                       f"{self.limits.wall_time_s:g} s and was stopped")  # fmt: skip

    async def _answer(
        self,
        message: dict[str, Any],
        gate: asyncio.Semaphore,
        on_call: Callable[[str, str], Awaitable[tuple[bool, str]]],
    ) -> None:
        async with gate:
            try:
                ok, text = await on_call(str(message["tool"]), str(message["input"]))
            except Exception as exc:  # a bug on the host side: the program still gets an answer
                logger.exception("codemode: answering a call to %s failed", message["tool"])
                ok, text = False, f"codemode.{message['tool']}: the host failed: {exc!r}"
        if ok and len(text) > self.limits.max_tool_result_chars:
            ok, text = (
                False,
                (
                    f"codemode.{message['tool']}: the result is {len(text)} characters of JSON, "
                    f"over the limit of {self.limits.max_tool_result_chars}"
                ),
            )
        if self.alive:
            self._send({"type": "result", "id": message["id"], "ok": ok, "text": text})

    def _decode(self, outcome: Outcome, raw: str) -> None:
        kind, _, payload = raw.partition(":")
        if kind == "ok":
            outcome.ok = True
            outcome.result_json = payload
        elif kind.startswith("limit-"):
            self._fail(outcome, kind.removeprefix("limit-"), payload)
        else:
            outcome.error = payload
            if any(marker in payload for marker in _MEMORY_ERRORS):
                outcome.limit = "memory"
            elif any(marker in payload for marker in _STACK_ERRORS):
                outcome.limit = "stack"

    @staticmethod
    def _fail(outcome: Outcome, limit: str, message: str) -> None:
        outcome.ok = False
        outcome.limit = limit
        outcome.error = message

    async def _watch_cpu(self) -> None:
        """Returns once the worker has used its CPU budget in this run. The first poll interval
        counts as fully used, so a run shorter than that costs no read of /proc at all."""
        assert self._proc is not None
        pid, budget = self._proc.pid, self.limits.cpu_time_s
        await asyncio.sleep(CPU_POLL_S)
        start = _cpu_seconds(pid) - CPU_POLL_S
        while _cpu_seconds(pid) - start <= budget:
            await asyncio.sleep(CPU_POLL_S)

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._proc.stdin.write(_wire.encode(message))

    async def _read_messages(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while True:
                message = await _wire.read_message(self._proc.stdout, self._max_inbound)
                if message is None:
                    break
                if message["type"] == "ready":
                    self._ready.set()
                else:
                    self._inbox.put_nowait(message)
        except _wire.WireError as exc:
            self._stderr.append(f"\nprotocol error: {exc}".encode())
            if self._proc.returncode is None:
                self._proc.kill()
        finally:
            self._hung_up = True
            self._inbox.put_nowait(None)

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        size = 0
        while chunk := await self._proc.stderr.read(4096):
            self._stderr.append(chunk)
            size += len(chunk)
            while size > STDERR_TAIL_BYTES and len(self._stderr) > 1:
                size -= len(self._stderr.popleft())

    def _tail(self) -> str:
        text = b"".join(self._stderr).decode(errors="replace").strip()
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("  ")]
        return f": {' | '.join(lines[-3:])[-300:]}" if lines else ""

    def _exit_description(self) -> str:
        code = self._proc.returncode if self._proc else None
        if code is None:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    async def _reaped(self) -> None:
        assert self._proc is not None
        await self._proc.wait()

    async def kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self._proc.wait()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 1.0)

    async def close(self) -> None:
        """Ask the worker to exit (end of its stdin), kill it if it does not at once."""
        if self._proc is None:
            return
        if self._proc.stdin is not None and self._proc.returncode is None:
            self._proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 1.0)
        await self.kill()
