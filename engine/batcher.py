"""The dynamic batcher of one model: queue, priorities, deadlines, one worker thread.

Event-loop side (cheap, no locks): `submit()` validates a request, appends it (a plain tuple)
to the queue of its priority level and returns its future. While the worker runs a batch,
requests queue; when it is free, a batch is dispatched:
  - at once when the queued rows fill the largest bucket;
  - adaptive batching (the default): at the end of the loop iteration in which the batch
    stopped growing. A lone request on an idle model runs at the end of its own iteration;
    a burst still arriving (new rows in each iteration) is waited for, at most
    `max_queue_delay_s` after its oldest request;
  - fixed batching (`adaptive_batching=False`): when the oldest request has waited
    `max_queue_delay_s` (0: at the end of the current loop iteration).
Dispatch takes requests highest priority first, FIFO within a level, until the next one would
overflow the largest bucket, and hands them to the worker thread in one `SimpleQueue.put`.
While the worker runs a batch and a full bucket is queued, the loop forms that next batch
at once ("staged"); the worker starts it as soon as its run ends, with no thread hop, and
hands the finished batch back with one `call_soon_threadsafe`. The loop cuts each request's
rows out of the batch outputs (views, cut in C for one-row requests) while the next batch
runs. So a request costs at most one thread hop each way, shared by its whole batch, and
under load none: the loop's per-request work overlaps the worker's ONNX Runtime run (which
releases the GIL). Per-batch metrics are kept as plain numbers and flushed to prometheus
when the worker idles.

Inline runs (`inline_max_run_s` > 0, CPU only): a batch whose bucket has recently run in at
most that long is run on the loop's own thread when the worker is idle, skipping both thread
hops; the loop is blocked for that run.

Deadlines: a request still queued at its deadline fails with `InferenceTimeout` and is never
run; one timer, armed for the earliest deadline, sweeps the queue and the staged batch, and
the worker drops requests of a staged batch whose deadline passed just before it starts it. A request already
running at its deadline completes normally. The queue is bounded in rows (`queue_limit`).

Why one future per request, not one per batch: every caller is its own task and must be
woken anyway, and a future shared by a batch's callers would be cancelled for all of them
when one caller is cancelled (`Task.cancel` cancels the future it awaits); a C future costs
less than the per-caller wrapper that would prevent that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from queue import Empty, SimpleQueue
from typing import Any

import numpy as np

from engine import graph_ops, metrics
from engine.errors import (
    EngineNotRunning,
    EngineOverloaded,
    InferenceFailed,
    InferenceTimeout,
    InvalidInput,
)
from engine.io import RequestValidator
from engine.providers import load_session
from engine.runner import Runner, split_rows
from engine.spec import LONE_INLINE_MAX_RUN_S, ModelSpec

log = logging.getLogger(__name__)

# How long a closing batcher waits for an idle worker thread to end.
_WORKER_EXIT_S = 1.0
# The worker flushes its per-batch metrics after this long without a job (or every
# _FLUSH_BATCHES batches under constant load), so metrics never add to request latency.
_FLUSH_IDLE_S = 0.001
_FLUSH_BATCHES = 64
_FLUSH_INLINE_S = 0.01  # inline runs leave the worker asleep: it is woken this often to flush
# Inline runs: a bucket's recent run time is max(this run's CPU time, previous estimate * _DECAY).
_DECAY = 0.9

Outputs = dict[str, np.ndarray]

# A queued request is a plain tuple, the cheapest object Python builds:
# (future, inputs, rows, enqueued_at, deadline), times in the loop's clock.
_Request = tuple["asyncio.Future[Outputs]", dict[str, np.ndarray], int, float, float]


class _Batch:
    """Requests taken from the queue to run together (one object per batch)."""

    __slots__ = (
        "first_deadline",
        "formed_at",
        "inputs",
        "load_s",
        "oldest",
        "requests",
        "row_counts",
        "rows",
    )

    def __init__(
        self,
        requests: list[_Request],
        inputs: list[dict[str, np.ndarray]],
        row_counts: list[int],
        rows: int,
        oldest: float,
        first_deadline: float,
        formed_at: float,
    ) -> None:
        self.requests = requests
        self.inputs = inputs
        self.row_counts = row_counts
        self.rows = rows
        self.oldest = oldest  # earliest enqueued_at
        self.first_deadline = first_deadline
        self.formed_at = formed_at
        self.load_s = 0.0  # copying the rows into the bucket (worker)

    def without(self, removed: list[_Request]) -> _Batch | None:
        """This batch minus `removed` (expired requests); None if nothing is left."""
        gone = {id(request) for request in removed}
        kept = [request for request in self.requests if id(request) not in gone]
        if not kept:
            return None
        return _Batch(
            kept,
            [r[1] for r in kept],
            [r[2] for r in kept],
            sum(r[2] for r in kept),
            min(r[3] for r in kept),
            min(r[4] for r in kept),
            self.formed_at,
        )


class Batcher:
    """Queue and worker thread of one model. Create and use on the event loop's thread."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.runner: Runner | None = None
        self.warmup_s = math.nan
        self._loop: asyncio.AbstractEventLoop | None = None
        self._levels: list[deque[_Request]] = [deque() for _ in range(spec.priority_levels)]
        self._queued_rows = 0
        self._max_rows = spec.max_batch_rows
        self._busy = False  # the worker owns a batch (set and cleared on the loop only)
        self._accepting = False
        self._dispatch_handle: asyncio.Handle | None = None
        self._dispatch_is_timer = False
        self._adaptive = spec.adaptive_batching and spec.max_queue_delay_s > 0
        self._grew = False  # (adaptive) rows arrived since the pending dispatch was scheduled
        self._default_timeout_s = spec.request_timeout_s
        self._queue_limit = spec.queue_limit
        self._priority_levels = spec.priority_levels
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._drained: asyncio.Future[None] | None = None
        self._jobs: SimpleQueue[Any] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._worker_exited: asyncio.Future[None] | None = None
        self._validate: RequestValidator | None = None
        self._clock: Callable[[], float] = time.monotonic  # loop.time, see _fast_loop_calls
        self._new_future: Callable[[], asyncio.Future[Any]] = asyncio.Future
        # The next full batch, formed on the loop while the worker runs one (at most one entry;
        # deque append/popleft are atomic, so whichever thread pops it owns it, no lock).
        self._staged: deque[_Batch] = deque()
        # Inline runs: the most a bucket's recent runs took, per bucket index (0: off).
        self._inline_max_s = spec.inline_max_run_s
        # Lone requests inline (set at load: CPU and a graph without control flow), or 0.
        self._inline_lone_s = 0.0
        self._recent_run_s: list[float] = [math.inf] * len(spec.buckets)
        self._flush_armed = False  # a timer will ask the worker to flush inline runs' metrics
        # Per-batch numbers for the metrics, appended by whichever thread ran the batch and
        # flushed by the worker when idle: (bucket rows, rows, run_s, cpu_s, queue_delay_s,
        # inline).
        self._batch_stats: deque[tuple[int, int, float, float, float, bool]] = deque()
        self._accepted = 0  # requests queued so far; the worker flushes it to the metric
        self._accepted_reported = 0
        self._report_lock = threading.Lock()
        name = spec.name
        self._m_requests = metrics.REQUESTS.labels(name)
        self._m_overloaded = metrics.REJECTED.labels(name, "overloaded")
        self._m_invalid = metrics.REJECTED.labels(name, "invalid_input")
        self._m_timed_out = metrics.TIMED_OUT.labels(name)
        self._m_failed = metrics.FAILED.labels(name)
        self._m_batch_rows = metrics.BATCH_ROWS.labels(name)
        self._m_inline = metrics.INLINE_BATCHES.labels(name)
        self._m_padding = metrics.PADDING_ROWS.labels(name)
        self._m_queue_delay = metrics.QUEUE_DELAY.labels(name)
        self._m_run = metrics.RUN_SECONDS.labels(name)
        self._m_cpu = metrics.BATCH_CPU_SECONDS.labels(name)
        self._m_queued = metrics.QUEUED_ROWS.labels(name)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker, load the model on it and warm every bucket; then accept work."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._clock, self._new_future = _fast_loop_calls(loop)
        self._worker_exited = loop.create_future()
        self._thread = threading.Thread(
            target=self._worker_main, name=f"engine-{self.spec.name}", daemon=True
        )
        self._thread.start()
        started = time.perf_counter()
        done: asyncio.Future[None] = loop.create_future()
        self._jobs.put((self._load_and_warm, (done,)))
        try:
            await done
        except BaseException:
            # Cancelled (a stop signal during a long warm-up) or failed: do not wait for a
            # warm-up that may take minutes; the worker ends when its current job does.
            self._terminate_runs()
            await self._stop_worker(_WORKER_EXIT_S)
            raise
        self.warmup_s = time.perf_counter() - started
        metrics.WARMUP_SECONDS.labels(self.spec.name).set(self.warmup_s)
        self._accepting = True

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting, let queued requests run (or time out), then stop the worker.

        With `timeout_s`, requests still queued at the deadline fail with `EngineNotRunning`,
        and a worker still inside a run (a stuck GPU, a model that never returns) is abandoned
        with an error log instead of holding the shutdown."""
        self._accepting = False
        if self._loop is None:
            return
        deadline = None if timeout_s is None else self._loop.time() + timeout_s
        if self._busy or self._queued_rows:
            self._drained = self._loop.create_future()
            if self._dispatch_is_timer and self._dispatch_handle is not None:
                # Closing: run what is queued now instead of waiting for batches to fill.
                self._dispatch_handle.cancel()
                self._dispatch_handle = None
            self._schedule_dispatch()
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(self._drained)
            except TimeoutError:
                log.error(
                    "engine: model %r: close timed out after %.1fs; failing %d queued rows and "
                    "terminating the run in progress",
                    self.spec.name,
                    timeout_s,
                    self._queued_rows,
                )
                self._fail_queued(
                    EngineNotRunning(f"model {self.spec.name!r}: engine closed before it ran")
                )
                self._terminate_runs()
        worker_s = None if deadline is None else max(deadline - self._loop.time(), _WORKER_EXIT_S)
        await self._stop_worker(worker_s)
        self._report_accepted()

    def _terminate_runs(self) -> None:
        runner = self.runner  # set by the worker; a run started before this sees the flag
        if runner is not None:
            runner.terminate()

    def _fail_queued(self, error: BaseException) -> None:
        failed: list[_Request] = []
        for level in self._levels:
            failed.extend(level)
            level.clear()
        while self._staged:
            try:
                failed.extend(self._staged.popleft().requests)
            except IndexError:  # the worker took it first: it runs (or fails) there
                break
        self._queued_rows = 0
        for request in failed:
            _set_exception(request[0], error)
        self._m_queued.set(0)

    async def _stop_worker(self, timeout_s: float | None) -> None:
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        self._jobs.put(None)
        exited = self._worker_exited
        assert exited is not None
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(exited)
        except TimeoutError:
            # Never a blocking join (nor one on the default executor, which the interpreter
            # joins at exit): the thread is a daemon thread and ends with the process.
            log.error(
                "engine: model %r: worker still busy in a run after %.1fs; abandoning it "
                "(its requests fail; the process can exit)",
                self.spec.name,
                timeout_s,
            )

    # -- event-loop side -------------------------------------------------------------------

    def submit(
        self,
        inputs: Mapping[str, np.ndarray] | np.ndarray,
        priority: int,
        timeout_s: float | None,
    ) -> asyncio.Future[Outputs]:
        """Queue one request; its future resolves to that request's rows of every output."""
        if not self._accepting:
            raise EngineNotRunning(
                f"model {self.spec.name!r} is not serving (engine not started or closing)"
            )
        validate = self._validate
        assert validate is not None
        try:
            checked, rows = validate(inputs)
            if (
                timeout_s is None
                and priority.__class__ is int
                and 0 <= priority < self._priority_levels
            ):
                timeout_s = self._default_timeout_s  # the common case, checked inline
            else:
                timeout_s = self._check_options(priority, timeout_s)
        except InvalidInput:
            self._m_invalid.inc()
            raise
        waiting = self._queued_rows
        if waiting + rows > self._queue_limit:
            self._m_overloaded.inc()
            raise EngineOverloaded(
                f"model {self.spec.name!r}: queue full ({waiting} of {self._queue_limit} rows "
                f"waiting, request has {rows}); retry later or raise queue_limit"
            )
        now = self._clock()
        future = self._new_future()
        deadline = now + timeout_s
        self._levels[priority].append((future, checked, rows, now, deadline))
        self._accepted += 1  # a plain int here; the worker adds it to the metric
        self._after_queued(waiting + rows, deadline)
        return future

    def submit_many(
        self,
        requests: Sequence[Mapping[str, np.ndarray] | np.ndarray],
        priority: int,
        timeout_s: float | None,
    ) -> list[tuple[asyncio.Future[Outputs], list[int]]]:
        """Queue several requests of one caller, packed in order into queue entries of at
        most the largest bucket's rows (one `np.concatenate` per input per entry): each entry's
        future, with the row counts of the requests it carries. All or nothing: bad input or a
        full queue rejects the whole call before anything is queued."""
        if not self._accepting:
            raise EngineNotRunning(
                f"model {self.spec.name!r} is not serving (engine not started or closing)"
            )
        validate = self._validate
        assert validate is not None
        name = self.spec.name
        try:
            if isinstance(requests, np.ndarray | Mapping) or not isinstance(requests, Sequence):
                raise InvalidInput(
                    f"model {name!r}: infer_many takes a list of requests (each a dict of "
                    f"arrays or one array), got {type(requests).__name__}; pass one request "
                    "to infer()"
                )
            checked: list[dict[str, np.ndarray]] = []
            row_counts: list[int] = []
            for index, request in enumerate(requests):
                try:
                    inputs, rows = validate(request)
                except InvalidInput as exc:
                    raise InvalidInput(f"requests[{index}]: {exc}") from None
                checked.append(inputs)
                row_counts.append(rows)
            timeout_s = self._check_options(priority, timeout_s)
            total = sum(row_counts)
            if total > self._queue_limit:
                raise InvalidInput(
                    f"model {name!r}: the requests carry {total} rows in all, more than the "
                    f"queue holds (queue_limit {self._queue_limit}); send them in several calls"
                )
        except InvalidInput:
            self._m_invalid.inc()
            raise
        if not checked:
            return []
        waiting = self._queued_rows
        if waiting + total > self._queue_limit:
            self._m_overloaded.inc()
            raise EngineOverloaded(
                f"model {name!r}: queue full ({waiting} of {self._queue_limit} rows "
                f"waiting, the requests have {total}); retry later or raise queue_limit"
            )
        entries: list[tuple[asyncio.Future[Outputs], list[int]]] = []
        now = self._clock()
        deadline = now + timeout_s
        level = self._levels[priority]
        capacity = self._max_rows
        start = 0
        count = len(checked)
        while start < count:
            end = start
            rows = 0
            while end < count and rows + row_counts[end] <= capacity:
                rows += row_counts[end]
                end += 1
            parts = checked[start:end]
            if len(parts) == 1:
                inputs = parts[0]
            else:
                inputs = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
            future = self._new_future()
            level.append((future, inputs, rows, now, deadline))
            entries.append((future, row_counts[start:end]))
            start = end
        self._accepted += count  # the caller's requests, however they were packed
        self._after_queued(waiting + total, deadline)
        return entries

    def _check_options(self, priority: int, timeout_s: float | None) -> float:
        """The request's timeout in seconds; `InvalidInput` for a bad priority or timeout."""
        if priority.__class__ is not int or not 0 <= priority < self._priority_levels:
            raise InvalidInput(
                f"model {self.spec.name!r}: priority must be an integer "
                f"0..{self._priority_levels - 1}, got {priority!r}"
            )
        if timeout_s is None:
            return self._default_timeout_s
        if not (isinstance(timeout_s, int | float) and 0 < timeout_s < math.inf):
            raise InvalidInput(
                f"model {self.spec.name!r}: timeout_s must be a positive number of "
                f"seconds, got {timeout_s!r}"
            )
        return timeout_s

    def _after_queued(self, queued: int, deadline: float) -> None:
        """Rows were queued (now `queued` in all): arm the deadline timer, dispatch or stage."""
        self._queued_rows = queued
        if deadline < self._expiry_at:
            self._arm_expiry(deadline)
        if self._busy:
            if queued >= self._max_rows and not self._staged:
                self._stage()
        elif self._dispatch_handle is None:
            self._schedule_dispatch()
        elif self._dispatch_is_timer:
            if queued >= self._max_rows:
                self._dispatch_handle.cancel()
                self._dispatch_handle = None
                self._schedule_dispatch()
        else:
            self._grew = True

    def queued_rows(self) -> int:
        """Rows waiting to be dispatched (not counting the batch running now)."""
        return self._queued_rows

    def _oldest_enqueued(self) -> float:
        return min(level[0][3] for level in self._levels if level)

    def _schedule_dispatch(self) -> None:
        if self._busy or self._dispatch_handle is not None or not self._queued_rows:
            return
        loop = self._loop
        assert loop is not None
        delay_s = self.spec.max_queue_delay_s
        if (
            self._adaptive
            or delay_s == 0
            or self._queued_rows >= self._max_rows
            or not self._accepting
        ):
            self._dispatch_handle = loop.call_soon(self._dispatch)
            self._dispatch_is_timer = False
            self._grew = False
        else:
            self._dispatch_handle = loop.call_at(self._oldest_enqueued() + delay_s, self._dispatch)
            self._dispatch_is_timer = True

    def _dispatch(self) -> None:
        self._dispatch_handle = None
        if self._busy:
            return
        if self._grew and self._queued_rows < self._max_rows and self._accepting:
            # Adaptive: rows arrived during this iteration; the batch may still grow.
            loop = self._loop
            assert loop is not None
            if loop.time() - self._oldest_enqueued() < self.spec.max_queue_delay_s:
                self._grew = False
                self._dispatch_handle = loop.call_soon(self._dispatch)
                self._dispatch_is_timer = False
                return
        self._grew = False
        batch = self._take()
        if batch is None:
            self._check_drained()
            return
        if self._inline_lone_s or self._inline_max_s:
            recent_s = self._recent_run_s[self._bucket_of(batch.rows)]
            if recent_s <= self._inline_max_s or (
                recent_s <= self._inline_lone_s
                and len(batch.requests) == 1
                and not self._queued_rows
            ):
                self._run_inline(batch)
                return
        self._busy = True
        self._jobs.put((self._run_batches, (batch,)))
        if self._queued_rows >= self._max_rows:
            self._stage()  # a full bucket is left (infer_many): the worker goes on with it

    def _stage(self) -> None:
        """While the worker runs a batch, form the next full one for it to start at once."""
        batch = self._take()
        if batch is not None:
            self._staged.append(batch)

    def _take(self) -> _Batch | None:
        """Remove the next batch from the queue: highest priority first, FIFO within a level,
        until the next request would overflow the largest bucket (it is never overtaken).
        Requests whose caller was cancelled are dropped. Loop thread only."""
        requests: list[_Request] = []
        inputs: list[dict[str, np.ndarray]] = []
        row_counts: list[int] = []
        rows = 0
        capacity = self._max_rows
        dropped = 0
        oldest = first_deadline = math.inf
        full = False
        for level in reversed(self._levels):  # highest priority first
            while level:
                request = level[0]
                future, request_inputs, request_rows, enqueued_at, deadline = request
                if future.done():  # the caller was cancelled
                    level.popleft()
                    dropped += request_rows
                    continue
                if rows + request_rows > capacity:
                    full = True  # never let a later request overtake this one
                    break
                level.popleft()
                requests.append(request)
                inputs.append(request_inputs)
                row_counts.append(request_rows)
                rows += request_rows
                if enqueued_at < oldest:
                    oldest = enqueued_at
                if deadline < first_deadline:
                    first_deadline = deadline
            if full:
                break
        self._queued_rows -= rows + dropped
        if not requests:
            return None
        return _Batch(requests, inputs, row_counts, rows, oldest, first_deadline, self._clock())

    def _bucket_of(self, rows: int) -> int:
        runner = self.runner
        assert runner is not None
        return runner.bucket_of(rows)

    def _run_inline(self, batch: _Batch) -> None:
        """Run `batch` on the loop's thread (the worker is idle) and hand out its results."""
        outputs, error = self._run_one(batch, inline=True)
        self._deliver(batch, outputs, error)
        if not self._flush_armed:  # the idle worker flushes the metrics, off this thread
            assert self._loop is not None
            self._flush_armed = True
            self._loop.call_later(_FLUSH_INLINE_S, self._request_flush)
        if self._queued_rows:
            self._schedule_dispatch()
        else:
            self._check_drained()

    def _request_flush(self) -> None:
        self._flush_armed = False
        self._jobs.put((self._flush_metrics, ()))

    def _complete(
        self, batch: _Batch, outputs: Outputs | None, error: str | None, last: bool
    ) -> None:
        """A batch ended (on the loop). `last`: the worker found no staged batch to go on with."""
        if last:
            self._busy = False
            if self._staged:
                # Staged after the worker looked: it is the next batch, start it now.
                with contextlib.suppress(IndexError):
                    staged = self._staged.popleft()
                    self._busy = True
                    self._jobs.put((self._run_batches, (staged,)))
            elif self._queued_rows >= self._max_rows:
                # A full batch queued since the worker looked: start it before handing out
                # results, so the worker computes while this loop wakes the callers.
                if self._dispatch_handle is not None:
                    self._dispatch_handle.cancel()
                self._dispatch()
        elif self._queued_rows >= self._max_rows and not self._staged:
            self._stage()  # the worker went on with the staged batch: stage the one after
        self._deliver(batch, outputs, error)
        if not self._busy:
            if self._queued_rows:
                self._schedule_dispatch()
            else:
                self._check_drained()

    def _deliver(self, batch: _Batch, outputs: Outputs | None, error: str | None) -> None:
        if outputs is not None:
            results = split_rows(outputs, batch.row_counts)
            for request, result in zip(batch.requests, results, strict=True):
                future = request[0]
                if not future.done():  # not cancelled while it ran
                    future.set_result(result)
        else:
            self._m_failed.inc(len(batch.requests))
            for request in batch.requests:
                _set_exception(request[0], InferenceFailed(error))

    def _fail_expired(self, expired: list[_Request], now: float) -> None:
        """Staged requests whose deadline passed before their batch started (on the loop)."""
        for request in expired:
            self._m_timed_out.inc()
            _set_exception(request[0], self._timeout_error(now - request[3]))

    def _timeout_error(self, waited_s: float) -> InferenceTimeout:
        return InferenceTimeout(
            f"model {self.spec.name!r}: request waited {waited_s * 1e3:.1f} ms in the queue, "
            "past its deadline; it was not run"
        )

    def _arm_expiry(self, deadline: float) -> None:
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
        assert self._loop is not None
        self._expiry_at = deadline
        self._expiry_handle = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Fail queued requests whose deadline passed; re-arm for the next deadline."""
        self._expiry_handle = None
        self._expiry_at = math.inf
        assert self._loop is not None
        now = self._loop.time()
        next_deadline = math.inf
        for index, level in enumerate(self._levels):
            kept: deque[_Request] = deque()
            for request in level:
                future, _, rows, enqueued_at, deadline = request
                if future.done():  # caller cancelled: drop it now
                    self._queued_rows -= rows
                elif deadline <= now:
                    self._queued_rows -= rows
                    self._m_timed_out.inc()
                    future.set_exception(self._timeout_error(now - enqueued_at))
                else:
                    kept.append(request)
                    next_deadline = min(next_deadline, deadline)
            self._levels[index] = kept
        next_deadline = min(next_deadline, self._expire_staged(now))
        if next_deadline < math.inf:
            self._arm_expiry(next_deadline)
        self._m_queued.set(self._queued_rows)
        self._report_accepted()
        if not self._queued_rows:
            self._check_drained()

    def _expire_staged(self, now: float) -> float:
        """Fail the staged batch's requests whose deadline passed (a long run ahead of it must
        not make them wait past it); the staged batch's next deadline, or inf."""
        if not self._staged:
            return math.inf
        try:
            batch: _Batch | None = self._staged.popleft()
        except IndexError:  # the worker just took it: it drops expired requests itself
            return math.inf
        assert batch is not None
        if batch.first_deadline <= now:
            expired = [r for r in batch.requests if r[4] <= now]
            self._fail_expired(expired, now)
            batch = batch.without(expired)
        if batch is None:
            return math.inf
        # If the worker ended meanwhile and found nothing, `_complete` starts this batch.
        self._staged.append(batch)
        return batch.first_deadline

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done() and not self._busy and not self._queued_rows:
            drained.set_result(None)

    # -- worker thread ---------------------------------------------------------------------

    def _worker_main(self) -> None:
        jobs = self._jobs
        try:
            while True:
                try:
                    job = jobs.get(timeout=_FLUSH_IDLE_S)
                except Empty:
                    self._flush_metrics()  # idle: nobody waits on this thread now
                    job = jobs.get()
                if job is None:
                    break
                function, args = job
                try:
                    function(*args)
                except Exception:  # never let the worker die: every later request would hang
                    log.exception("engine: model %r: worker job failed", self.spec.name)
        finally:
            with contextlib.suppress(Exception):
                self._flush_metrics()
            exited = self._worker_exited
            if self._loop is not None and exited is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(_set_result, exited, None)

    def _load_and_warm(self, done: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            self.runner = Runner(self.spec, load_session(self.spec))
            self._validate = RequestValidator(
                self.spec.name, self.runner.inputs, self.spec.max_batch_rows
            )
            self.runner.warm_up()
            if self.runner.device == "cpu":
                self._recent_run_s = list(self.runner.warm_cpu_s)
                if self.spec.inline_lone_requests:
                    self._inline_lone_s = self._lone_inline_limit()
            else:
                self._inline_max_s = 0.0  # CUDA graphs replay only on the worker's thread
        except BaseException as exc:
            loop.call_soon_threadsafe(_set_exception, done, exc)
        else:
            loop.call_soon_threadsafe(_set_result, done, None)

    def _lone_inline_limit(self) -> float:
        """Seconds a lone request's bucket may take to run inline; 0 when the graph's run time
        may depend on the input values (control flow, custom ops) or cannot be read."""
        ops = graph_ops.op_types(self.spec.path)
        unbounded = ["the file could not be read"] if ops is None else graph_ops.unbounded_ops(ops)
        if not unbounded:
            return max(LONE_INLINE_MAX_RUN_S, self._inline_max_s)
        log.info(
            "engine: model %r: lone requests run on the worker thread, not inline (the graph "
            "has ops whose run time may depend on the input values: %s)",
            self.spec.name,
            ", ".join(unbounded),
        )
        return 0.0

    def _run_batches(self, batch: _Batch) -> None:
        """Run the batch the loop dispatched, then every batch it staged meanwhile."""
        loop = self._loop
        assert loop is not None
        post = loop.call_soon_threadsafe
        staged = self._staged
        loaded = self._load(batch)
        while True:
            outputs, error = self._execute(batch, loaded)
            following: _Batch | None = None
            while staged:
                try:
                    following = staged.popleft()
                except IndexError:  # the loop took it back (closing)
                    break
                following = self._drop_expired(following, post)
                if following is not None:
                    break
            if following is not None:
                # Copied in before the loop is woken: from the wake-up to the next run
                # releasing the GIL, the loop and this thread would only contend for it.
                loaded = self._load(following)
            try:
                post(self._complete, batch, outputs, error, following is None)
            except RuntimeError:  # loop closed under us: nobody is waiting any more
                return
            if following is None:
                return
            if len(self._batch_stats) >= _FLUSH_BATCHES:
                self._flush_metrics()
            batch = following

    def _drop_expired(self, batch: _Batch, post: Callable[..., object]) -> _Batch | None:
        """`batch` without requests whose deadline passed while it was staged (they fail
        with `InferenceTimeout` on the loop); None if none is left."""
        now = time.monotonic()
        if batch.first_deadline > now:
            return batch
        expired = [r for r in batch.requests if r[4] <= now]
        with contextlib.suppress(RuntimeError):
            post(self._fail_expired, expired, now)
        return batch.without(expired)

    def _run_one(self, batch: _Batch, inline: bool = False) -> tuple[Outputs | None, str | None]:
        """Load and run one batch (the worker, or the loop's thread for an inline run)."""
        return self._execute(batch, self._load(batch), inline)

    def _load(self, batch: _Batch) -> int | str:
        """Copy the batch into its bucket: the bucket's index, or the error message."""
        runner = self.runner
        assert runner is not None
        started = time.perf_counter()
        try:
            index = runner.load(batch.inputs, batch.rows)
        except Exception as exc:  # never expected after validation; fail the batch, not us
            return self._failure(exc)
        finally:
            batch.load_s = time.perf_counter() - started
        return index

    def _failure(self, exc: Exception) -> str:
        error = f"model {self.spec.name!r}: onnxruntime run failed: {type(exc).__name__}: {exc}"
        log.error("engine: %s", error)
        return error

    def _execute(
        self, batch: _Batch, loaded: int | str, inline: bool = False
    ) -> tuple[Outputs | None, str | None]:
        """Run a loaded batch and record its stats; (outputs, None) or (None, error)."""
        if isinstance(loaded, str):
            return None, loaded
        runner = self.runner
        assert runner is not None
        cpu_started = time.thread_time()
        started = time.perf_counter()
        outputs: Outputs | None = None
        error: str | None = None
        try:
            outputs = runner.run_loaded(loaded, batch.rows)
        except Exception as exc:  # ORT failure: fail this batch, keep serving
            error = self._failure(exc)
        run_s = time.perf_counter() - started + batch.load_s
        cpu_s = time.thread_time() - cpu_started
        # Inline runs are judged by the run's CPU time: a thread the OS took off its CPU for a
        # while (a busy machine) says nothing about how long the model keeps the loop busy.
        spent_s = cpu_s + batch.load_s
        recent = self._recent_run_s[loaded] * _DECAY
        self._recent_run_s[loaded] = spent_s if spent_s > recent else recent
        self._batch_stats.append(
            (
                self.spec.buckets[loaded],
                batch.rows,
                run_s,
                cpu_s,
                batch.formed_at - batch.oldest,
                inline,
            )
        )
        return outputs, error

    def _flush_metrics(self) -> None:
        """Add the batches run since the last call to the metrics (worker thread)."""
        stats = self._batch_stats
        runner = self.runner
        if runner is None:
            return
        while stats:
            try:
                bucket_rows, rows, run_s, cpu_s, queue_delay_s, inline = stats.popleft()
            except IndexError:
                break
            self._m_run.observe(run_s)
            self._m_cpu.observe(cpu_s)
            self._m_batch_rows.observe(rows)
            self._m_padding.inc(bucket_rows - rows)
            self._m_queue_delay.observe(max(queue_delay_s, 0.0))
            if inline:
                self._m_inline.inc()
        runner.flush_metrics()
        self._m_queued.set(self._queued_rows)
        self._report_accepted()

    def _report_accepted(self) -> None:
        """Add requests accepted since the last call to the metric (any thread)."""
        with self._report_lock:
            accepted = self._accepted  # only the loop thread writes it; int reads are atomic
            self._m_requests.inc(accepted - self._accepted_reported)
            self._accepted_reported = accepted


def _fast_loop_calls(
    loop: asyncio.AbstractEventLoop,
) -> tuple[Callable[[], float], Callable[[], asyncio.Future[Any]]]:
    """`loop.time` and `loop.create_future`, minus a Python method call each where the loop
    does not override asyncio's own (whose time() is time.monotonic() and whose
    create_future() is Future(loop=loop)); other loops (uvloop) keep their own."""
    cls = type(loop)
    clock = time.monotonic if cls.time is asyncio.BaseEventLoop.time else loop.time
    if cls.create_future is asyncio.BaseEventLoop.create_future:
        return clock, functools.partial(asyncio.Future, loop=loop)
    return clock, loop.create_future


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
