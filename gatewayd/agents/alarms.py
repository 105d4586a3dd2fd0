"""Schedules, the queue and `retry()` wired into the agent runtime (a mixin of AgentRuntime).

The storage blocks (`ScheduleStore`, `QueueStore`, `ScheduleIndex`, `retry`) live in their own
modules; this one decides *when* they run:

- An *alarm* event is queued for an agent when the gateway-wide `ScheduleIndex` says it is due
  (this wakes hibernated agents, and after a restart runs overdue schedules), after a turn
  that queued work has committed (drain on enqueue), and on every wake of an agent that has a
  schedule or queue table (drain on wake).
- An alarm runs, in the agent's FIFO order, every due schedule and then every ready queue
  item, each as its own turn (SAVEPOINT) inside one transaction. A failing run is rolled back
  and recorded with `mark_failed` (retry with backoff, outside the failed savepoint); once the
  retries are used up `on_error` gets a `ScheduleFailedError` / `QueueItemFailedError` and the
  failure stays visible (`_gw_schedule_failures`, queue dead letters).
- After the commit the agent's next due time is written to the index (agent DB first, index
  second: a stale index entry costs one needless wake, never a lost schedule). The index file
  is only touched on its own thread (`LoopScheduleIndex`): no fsync on the event loop.
- The timer loop runs under the runtime's `Supervisor`: if it crashes it is logged, restarted
  with backoff, and the runtime reports unhealthy until it runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from gatewayd.agents.errors import (
    AgentError,
    QueueItemFailedError,
    ScheduleFailedError,
)
from gatewayd.agents.queue import QueueStore
from gatewayd.agents.retry import RetryPolicy, retry
from gatewayd.agents.schedule_index import LoopScheduleIndex
from gatewayd.agents.schedules import ScheduleStore
from gatewayd.agents.slot import ALARM as _ALARM
from gatewayd.agents.slot import SCHEDULED as _SCHEDULED
from gatewayd.agents.slot import Event as _Event
from gatewayd.agents.slot import Slot as _Slot

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from gatewayd.agents.agent import Agent
    from gatewayd.agents.settings import AgentSettings
    from gatewayd.agents.storage import AgentDatabase
    from gatewayd.supervisor import Supervisor

logger = logging.getLogger(__name__)

INDEX_FILE = "schedule-index.sqlite3"
_MAX_ALARM_SLEEP_S = 30.0
_MIN_ALARM_SLEEP_S = 0.05  # while due agents are still busy with their alarm
_WAKE_BATCH = 1000  # due agents woken per timer tick (the LRU cap bounds memory anyway)


def _policy(retry_option: Any) -> RetryPolicy | None:
    if retry_option is None or isinstance(retry_option, RetryPolicy):
        return retry_option
    if isinstance(retry_option, dict):
        return RetryPolicy.from_options(retry_option)
    raise AgentError(f"retry must be a RetryPolicy or a dict of its options, got {retry_option!r}")


class _Runtime(Protocol):
    """What the mixin needs from AgentRuntime (mypy's self-type for the mixin)."""

    settings: AgentSettings
    classes: dict[str, type[Agent]]
    _loop: asyncio.AbstractEventLoop | None
    _executor: ThreadPoolExecutor | None
    _background: list[asyncio.Task[None]]
    _accepting: bool
    _supervisor: Supervisor
    _index: LoopScheduleIndex | None
    _alarm_changed: asyncio.Event | None
    _alarm_pending: set[tuple[str, str]]
    _next_alarm_at: float

    def _enqueue(self, key: tuple[str, str], event: _Event) -> _Slot: ...
    async def _turn(
        self, slot: _Slot, event: _Event, done: list[Any], undo: list[Any], *, report: bool = ...
    ) -> BaseException | None: ...
    async def _on_error_turn(self, slot: _Slot, err: BaseException) -> None: ...
    def _db_for_turn(self, slot: _Slot) -> AgentDatabase: ...
    async def _alarm_forever(self) -> None: ...
    def _enqueue_alarm(self, key: tuple[str, str]) -> None: ...
    def _next_due_at(self, slot: _Slot) -> float | None: ...
    def _schedule_store(self, slot: _Slot) -> ScheduleStore: ...
    def _queue_store(self, slot: _Slot) -> QueueStore: ...
    def _schedules(self, slot: _Slot) -> ScheduleStore: ...
    def _queue(self, slot: _Slot) -> QueueStore: ...
    def _check_method(self, slot: _Slot, method: str) -> None: ...
    def _named_method(self, agent: Agent, name: Any) -> Any: ...


class AlarmsMixin:
    """Schedules/queue/retry for `AgentRuntime` (see the module docstring)."""

    _index: LoopScheduleIndex | None = None
    _alarm_changed: asyncio.Event | None = None
    _alarm_pending: set[tuple[str, str]]
    _next_alarm_at: float = 0.0

    # -- lifecycle hooks called by AgentRuntime ----------------------------------------------

    def _on_started(self: _Runtime) -> None:
        self._index = LoopScheduleIndex(
            self.settings.state_dir / INDEX_FILE,
            synchronous_full=self.settings.durability == "full",
        )
        self._alarm_pending = set()
        self._alarm_changed = asyncio.Event()
        self._background.append(self._supervisor.spawn("alarms", self._alarm_forever))

    def _on_closed(self: _Runtime) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def _after_wake(self: _Runtime, slot: _Slot) -> None:
        db = slot.db
        assert db is not None
        # As the open read them, unless the START turn used a store (it may have created
        # the schedule or queue table since).
        opened = db.take_opened_alarm_tables()
        tables = opened if opened is not None and not slot.stores else db.alarm_tables()
        if tables:  # drain on wake: overdue schedules, ready (or retried) queue items
            slot.drain_queued = True
            slot.index_dirty = True

    def _after_commit(self: _Runtime, slot: _Slot) -> None:
        if slot.index_dirty and slot.db is not None and self._index is not None:
            slot.index_dirty = False
            next_at = self._next_due_at(slot)
            self._index.set_next(slot.key[0], slot.key[1], next_at)
            if next_at is not None and next_at < self._next_alarm_at and self._alarm_changed:
                self._alarm_changed.set()
        if slot.drain_queued:
            slot.drain_queued = False
            self._enqueue_alarm(slot.key)

    def _on_destroyed(self: _Runtime, key: tuple[str, str]) -> None:
        if self._index is not None:
            self._index.set_next(key[0], key[1], None)

    # -- the timer --------------------------------------------------------------------------

    async def _alarm_forever(self: _Runtime) -> None:
        assert self._index is not None and self._alarm_changed is not None
        while True:
            self._alarm_changed.clear()
            now = time.time()
            if self._accepting:
                for due in await self._index.due(now, limit=_WAKE_BATCH):
                    key = (due.agent_class, due.agent_id)
                    if key[0] not in self.classes:
                        logger.warning(
                            "agents: schedule index names unknown agent class %r (agent %r); "
                            "dropping its entry",
                            key[0],
                            key[1],
                        )
                        self._index.set_next(key[0], key[1], None)
                        continue
                    self._enqueue_alarm(key)
            next_at = await self._index.next_wake_at()
            sleep_s = _MAX_ALARM_SLEEP_S if next_at is None else next_at - time.time()
            sleep_s = min(max(sleep_s, _MIN_ALARM_SLEEP_S), _MAX_ALARM_SLEEP_S)
            self._next_alarm_at = time.time() + sleep_s
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep_s):
                    await self._alarm_changed.wait()

    def _enqueue_alarm(self: _Runtime, key: tuple[str, str]) -> None:
        if key in self._alarm_pending or not self._accepting:
            return
        self._alarm_pending.add(key)
        self._enqueue(key, _Event(_ALARM, None))

    # -- one alarm: due schedules, then ready queue items -----------------------------------

    async def _run_alarm(self: _Runtime, slot: _Slot, done: list[Any], undo: list[Any]) -> None:
        self._alarm_pending.discard(slot.key)
        slot.index_dirty = True
        db = slot.db
        assert db is not None
        # The stores below may create tables outside any turn: a failing turn must not undo
        # them with the whole transaction (storage.py: turn_savepoint).
        db.keep_savepoints()
        tables = db.alarm_tables()
        if "_gw_schedules" in tables:
            schedules = self._schedule_store(slot)
            started = time.time()
            for schedule in schedules.due(started):
                if not schedules.mark_started(schedule.id, started):
                    continue  # cancelled by an earlier run in this alarm
                event = _Event(_SCHEDULED, None, None, schedule.method, schedule.payload)
                err = await self._turn(slot, event, done, undo, report=False)
                if err is None:
                    schedules.mark_done(schedule.id, time.time())
                    continue
                decision = schedules.mark_failed(
                    schedule.id, time.time(), f"{type(err).__name__}: {err}"
                )
                if decision is not None and decision.gave_up:
                    await self._on_error_turn(
                        slot,
                        ScheduleFailedError(
                            f"schedule {schedule.method} ({schedule.kind}, id {schedule.id}) "
                            f"failed {decision.attempts} times, last: {decision.error}"
                        ),
                    )
        if "_gw_queue" in tables:
            queue = self._queue_store(slot)
            budget = self.settings.max_turns_per_commit
            while True:
                item = queue.next_pending(time.time())
                if item is None:
                    break
                if budget == 0:
                    slot.drain_queued = True  # continue after this commit
                    break
                budget -= 1
                event = _Event(_SCHEDULED, None, None, item.method, item.payload)
                err = await self._turn(slot, event, done, undo, report=False)
                if err is None:
                    queue.mark_done(item.id)
                    continue
                decision = queue.mark_failed(item.id, f"{type(err).__name__}: {err}", time.time())
                if decision is not None and decision.gave_up:
                    await self._on_error_turn(
                        slot,
                        QueueItemFailedError(
                            f"queued {item.method} (id {item.id}) failed {decision.attempts} "
                            f"times and is now a dead letter; last: {decision.error}"
                        ),
                    )

    def _next_due_at(self: _Runtime, slot: _Slot) -> float | None:
        db = slot.db
        assert db is not None
        times: list[float] = []
        tables = db.alarm_tables()
        # Reads outside a transaction (after the commit): fine, nothing else writes.
        if "_gw_schedules" in tables and (t := self._schedule_store(slot).next_due_at()):
            times.append(t)
        if "_gw_queue" in tables and (t := self._queue_store(slot).next_ready_at()):
            times.append(t)
        return min(times) if times else None

    # -- stores (created lazily, inside a turn, per wake) -----------------------------------

    def _schedule_store(self: _Runtime, slot: _Slot) -> ScheduleStore:
        store = slot.stores.get("schedules")
        if store is None:
            assert slot.db is not None
            store = slot.stores["schedules"] = ScheduleStore(slot.db.connection)
        return store

    def _queue_store(self: _Runtime, slot: _Slot) -> QueueStore:
        store = slot.stores.get("queue")
        if store is None:
            assert slot.db is not None
            store = slot.stores["queue"] = QueueStore(slot.db.connection)
        return store

    # -- the Agent API ----------------------------------------------------------------------

    def _schedules(self: _Runtime, slot: _Slot) -> ScheduleStore:
        self._db_for_turn(slot)
        return self._schedule_store(slot)

    def _queue(self: _Runtime, slot: _Slot) -> QueueStore:
        self._db_for_turn(slot)
        slot.index_dirty = True  # dequeue() may change what is next
        return self._queue_store(slot)

    def _schedule(
        self: _Runtime, slot: _Slot, when: Any, method: str, payload: Any, **options: Any
    ) -> Any:
        self._check_method(slot, method)
        every_s = options.pop("every_s", None)
        policy = _policy(options.pop("retry", None))
        if options:
            raise AgentError(f"schedule(): unknown option(s) {', '.join(sorted(options))}")
        store = self._schedules(slot)
        slot.index_dirty = True
        return store.add(when, method, payload, every_s=every_s, retry=policy, now=time.time())

    def _cancel_schedule(self: _Runtime, slot: _Slot, schedule_id: str) -> bool:
        slot.index_dirty = True
        return self._schedules(slot).cancel(schedule_id)

    def _queue_push(self: _Runtime, slot: _Slot, method: str, payload: Any, **options: Any) -> Any:
        self._check_method(slot, method)
        policy = _policy(options.pop("retry", None))
        if options:
            raise AgentError(f"queue(): unknown option(s) {', '.join(sorted(options))}")
        item = self._queue(slot).push(method, payload, retry=policy, now=time.time())
        slot.drain_queued = True  # drain on enqueue, once this turn has committed
        return item

    async def _retry(self: _Runtime, fn: Any, **options: Any) -> Any:
        return await retry(
            fn,
            max_attempts=options["max_attempts"],
            base_delay_s=options["base_delay"],
            max_delay_s=options["max_delay"],
            should_retry=options["should_retry"],
        )

    def _check_method(self: _Runtime, slot: _Slot, method: str) -> None:
        assert slot.agent is not None
        self._named_method(slot.agent, method)

    def _named_method(self: _Runtime, agent: Agent, name: Any) -> Any:
        if not isinstance(name, str) or name.startswith("_"):
            raise AgentError(f"{name!r} is not a public method name of {agent.agent_class}")
        method = getattr(agent, name, None)
        if method is None or not callable(method):
            raise AgentError(f"agent {agent.agent_class} has no method {name!r}")
        return method
