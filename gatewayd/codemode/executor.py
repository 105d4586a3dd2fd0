"""`CodeExecutor`: runs programs in a pool of warm sandbox worker processes.

    async with CodeExecutor(workers=2) as executor:
        result = await executor.run("async () => (await codemode.add({a: 1, b: 2}))", [add])
        result.result, result.logs, result.error

Each worker keeps one fresh V8 context prepared; a run takes an idle worker, uses its context
once, and the worker prepares the next. A run that meets a limit (time, CPU, memory, stack,
result size, tool calls) or kills its worker ends with `error` and `limit` set, and that worker
is killed and replaced in the background: the next run never sees what the last one did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from gatewayd.codemode.bindings import Approve, Caller, bind
from gatewayd.codemode.limits import CodeModeError, Limits
from gatewayd.codemode.process import LogLine, WorkerProcess
from gatewayd.tools import Tool

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """How a program ended: its return value (JSON-decoded) or an error, and its logs."""

    ok: bool
    result: Any = None
    error: str | None = None
    limit: str | None = None  # which limit stopped it, when one did
    logs: list[LogLine] = field(default_factory=list)
    tool_calls: int = 0
    elapsed_s: float = 0.0
    worker_pid: int | None = None  # the process that ran it (tests check replacement)

    def for_model(self) -> dict[str, Any]:
        """What a model is shown: the result or the error, and the logs."""
        shown: dict[str, Any] = {"result": self.result} if self.ok else {"error": self.error}
        if self.logs:
            shown["logs"] = [
                line.text if line.level == "log" else f"[{line.level}] {line.text}"
                for line in self.logs
            ]
        return shown


class CodeExecutor:
    """A pool of `workers` sandbox processes, each running one program at a time."""

    def __init__(self, limits: Limits | None = None, *, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"CodeExecutor needs at least one worker, got {workers}")
        self.limits = limits or Limits()
        self._size = workers
        self._idle: list[WorkerProcess] = []
        self._workers: set[WorkerProcess] = set()  # every started worker not yet killed
        self._live = 0  # idle + busy + starting
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self.replaced = 0  # workers killed after a limit or a crash

    async def __aenter__(self) -> CodeExecutor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every worker now (otherwise they start on first use). Raises CodeModeError."""
        while self._live < self._size:
            self._live += 1
            try:
                worker = await self._spawn()
            except BaseException:
                self._live -= 1
                raise
            await self._put_idle(worker)

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the live workers, idle or busy."""
        return sorted(w.pid for w in self._workers if w.pid is not None and w.alive)

    async def run(
        self, code: str, tools: Sequence[Tool] = (), *, approve: Approve | None = None
    ) -> RunResult:
        """Run one program with `tools` as `codemode.<name>(input)`. Never raises for what the
        program does (that is in the result); raises CodeModeError if no worker can start."""
        started = time.perf_counter()
        if len(code) > self.limits.max_code_chars:
            return RunResult(
                ok=False, limit="code",
                error=f"the program is {len(code)} characters, over the limit of "
                f"{self.limits.max_code_chars}",
            )  # fmt: skip
        bound = bind(tools)
        for attempt in range(2):
            worker = await self._acquire()
            pid = worker.pid
            try:
                outcome = await worker.run(code, list(bound), Caller(bound, approve))
            except BaseException:
                self._retire(worker)
                raise
            if outcome.worker_must_go:
                self._retire(worker)
            else:
                self._after_run(worker)
            # A worker found dead before it read the program: run it once more on another.
            if not (outcome.limit == "worker_died" and outcome.messages == 0 and attempt == 0):
                break
        result = RunResult(
            ok=outcome.ok, error=outcome.error, limit=outcome.limit, logs=outcome.logs,
            tool_calls=outcome.tool_calls, worker_pid=pid,
        )  # fmt: skip
        if outcome.ok and outcome.result_json:
            result.result = json.loads(outcome.result_json)
        result.elapsed_s = time.perf_counter() - started
        return result

    async def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._idle = []
        workers, self._workers = list(self._workers), set()
        await asyncio.gather(*(worker.close() for worker in workers))
        self._live = 0

    async def _spawn(self) -> WorkerProcess:
        worker = WorkerProcess(self.limits)
        self._workers.add(worker)
        try:
            await worker.start()
        except BaseException:
            self._workers.discard(worker)
            raise
        return worker

    async def _acquire(self) -> WorkerProcess:
        if self._closed:
            raise CodeModeError("the Code Mode executor is closed")
        async with self._changed:
            while True:
                while self._idle and not self._idle[-1].alive:  # died while idle
                    self._retire(self._idle.pop())
                if self._idle or self._live < self._size:
                    break
                await self._changed.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return await self._spawn()
        except BaseException:
            self._live -= 1
            raise

    async def _put_idle(self, worker: WorkerProcess) -> None:
        async with self._changed:
            self._idle.append(worker)
            self._changed.notify()

    async def _lost(self) -> None:
        async with self._changed:
            self._live -= 1
            self._changed.notify()

    def _after_run(self, worker: WorkerProcess) -> None:
        """Back to the pool once the worker has its next context ready."""

        async def back() -> None:
            try:
                await worker.wait_ready()
            except CodeModeError as exc:
                logger.warning("codemode: a worker died between runs: %s", exc)
                await worker.kill()
                self._workers.discard(worker)
                await self._lost()
                self._replace()
                return
            await self._put_idle(worker)

        self._track(back())

    def _retire(self, worker: WorkerProcess) -> None:
        """Kill `worker` and start its replacement, so the pool stays warm."""
        self.replaced += 1

        async def retire() -> None:
            await worker.kill()
            self._workers.discard(worker)
            await self._lost()
            self._replace()

        self._track(retire())

    def _replace(self) -> None:
        async def refill() -> None:
            async with self._changed:
                if self._closed or self._live >= self._size:
                    return
                self._live += 1
            try:
                worker = await self._spawn()
            except CodeModeError as exc:
                logger.error("codemode: could not replace a worker: %s", exc)
                await self._lost()
                return
            await self._put_idle(worker)

        self._track(refill())

    def _track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
