"""`AgentRuntime`: runs agents, one turn at a time each, behind the output gate.

It implements `protocols.link.LinkHandler`: transports call `open_link`, `submit_message` and
`close_link`, which enqueue an event for the route's agent synchronously and return a future
resolved only after the turn that consumed the event has committed. Mailboxes are bounded
(`max_mailbox_events`): when the agent's is full, `open_link`/`submit_message` return a future
failed with `Backpressure` (nothing queued; resubmit once its `ready` resolves) and in-process
calls fail with `MailboxFullError` (also beyond `max_pending_calls` calls in flight).

This module is the facade (lifecycle, the LinkHandler and in-process API, and the `AgentHost`
each agent instance talks to); the work is split by job:

- scheduler.py: slots, each agent's bounded FIFO mailbox and the task that drains it in
  batches; hibernation of idle agents and LRU eviction beyond `max_active_agents`; `destroy()`.
- batch.py: one batch = one SQLite transaction and its output gate; waking an agent; the
  commit path (`BatchRunner.commit_batch`) and the commit points of streaming RPC chunks.
- turn.py: one event as one turn in its own SAVEPOINT; state changes; hook errors.
- registry.py: the open connections of every agent (they outlive hibernation).
- rpc.py: `@callable` lookup, argument checks, RPC replies and streams.
- alarms.py: schedules, the queue and retry (a mixin of this class).
- outbox.py: outputs for devices, durable until delivered (rows written by turn.py, released
  and deleted by batch.py and scheduler.py, sent again after a restart from here).

Different agents run concurrently on the one event loop. No fsync ever runs on the loop (see
batch.py). Idle agents hibernate (SQLite closed, instance dropped) after `hibernate_after_s`;
their connections stay with the runtime and the next event wakes the agent (`on_start` runs
again).

Agents' own background tasks (`AgentHost.start_task`: e.g. a chat agent's model stream) are
owned here, outside any turn and any agent instance: they outlive hibernation, write only
through turns they queue (`AgentHost.submit`), and are cancelled first in `drain()`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gatewayd.agents.agent import Agent
from gatewayd.agents.alarms import AlarmsMixin
from gatewayd.agents.batch import BatchRunner
from gatewayd.agents.committer import GroupCommitter
from gatewayd.agents.connection import Connection
from gatewayd.agents.errors import AgentError, MailboxFullError, NoEngineError
from gatewayd.agents.metrics import COMMIT_SECONDS, MAILBOX_FULL, new_counters
from gatewayd.agents.outbox import Outbox, Settlement
from gatewayd.agents.queue import QueueStore
from gatewayd.agents.registry import ConnectionRegistry
from gatewayd.agents.rpc import RpcDispatcher
from gatewayd.agents.scheduler import SlotScheduler
from gatewayd.agents.schedules import ScheduleStore
from gatewayd.agents.settings import AgentSettings
from gatewayd.agents.slot import (
    CALL,
    CLOSE,
    CONNECT,
    FN,
    MESSAGE,
    AgentKey,
    Done,
    Event,
    Slot,
)
from gatewayd.agents.storage import (
    AgentDatabase,
    agent_db_file,
    validate_agent_id,
    validate_class_name,
)
from gatewayd.agents.turn import TurnRunner
from gatewayd.supervisor import Supervisor
from protocols.link import Backpressure, DedupKey, DurableOutputs, Link, LinkRejected, Outcome

logger = logging.getLogger(__name__)

StateObserver = Callable[[str, str, Any], None]
"""`observer(agent_class, agent_id, state)`: see `AgentRuntime.add_state_observer`."""

_STUCK_LOG_INTERVAL_S = 60.0  # how often a stuck commit is logged again while it lasts


class AgentRuntime(AlarmsMixin):
    """Runs the agents of `classes` (`{"thermostat": Thermostat}`) under `settings`.

    `engine`, if given, is any object with `async infer(model, inputs, **kw)`.
    Lifecycle: `await start()` -> serve -> `await drain(timeout_s)` -> `await close()`.
    """

    def __init__(
        self,
        settings: AgentSettings,
        classes: Mapping[str, type[Agent]],
        engine: Any = None,
        generators: Mapping[str, Any] | None = None,
    ) -> None:
        for name, cls in classes.items():
            validate_class_name(name)
            if not (isinstance(cls, type) and issubclass(cls, Agent)):
                raise TypeError(f"agent class {name!r} must be a subclass of Agent, got {cls!r}")
        if engine is not None and not inspect.iscoroutinefunction(getattr(engine, "infer", None)):
            raise TypeError("engine must have an `async def infer(model, inputs, **kw)` method")
        self.settings = settings
        self.classes: dict[str, type[Agent]] = dict(classes)
        self.engine = engine
        # Local language models by name (engine.generate.Generator), for Agent.generate.
        self.generators: dict[str, Any] = dict(generators or {})
        self._executor: ThreadPoolExecutor | None = None
        self._committer: GroupCommitter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: list[asyncio.Task[None]] = []
        self._accepting = False
        self._closed = False
        self._stuck_logged_at = -_STUCK_LOG_INTERVAL_S
        self._supervisor = Supervisor("agents")  # the background loops (see supervisor.py)
        self._pending_calls = 0
        # Agents' own background tasks (AgentHost.start_task), by agent and name.
        self._agent_tasks: dict[AgentKey, dict[str, asyncio.Task[Any]]] = {}
        self._counters = new_counters()
        self._state_observers: list[StateObserver] = []
        self._registry = ConnectionRegistry()
        self._outbox = Outbox(max_undelivered=settings.max_undelivered_outputs)
        self._turns = TurnRunner(
            settings,
            self._registry,
            RpcDispatcher(commit_point=lambda slot, turn: self._batches.commit_point(slot, turn)),
            self._counters,
            named_method=self._named_method,
            outputs=self._outbox,
        )
        self._scheduler = SlotScheduler(
            settings,
            self.classes,
            self._registry,
            self._counters,
            run_batch=lambda slot: self._batches.run_batch(slot),
            on_destroyed=self._on_destroyed,
            outputs=self._outbox,
        )
        self._batches = BatchRunner(
            settings,
            self._scheduler,
            self._registry,
            self._turns,
            self._counters,
            make_host=lambda slot: _AgentHandle(self, slot),
            run_alarm=self._run_alarm,
            after_wake=self._after_wake,
            after_commit=self._committed,
            wake_failed=lambda slot: self._alarm_pending.discard(slot.key),
            outputs=self._outbox,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        (self.settings.state_dir / "agents").mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.commit_threads, thread_name_prefix="gatewayd-commit"
        )
        self._committer = GroupCommitter(
            self._loop,
            self._executor,
            self.settings.commit_threads,
            on_group_done=lambda _count, elapsed_s: COMMIT_SECONDS.observe(elapsed_s),
        )
        self._scheduler.start(self._loop, self._executor)
        self._batches.start(self._loop, self._executor, self._committer)
        await self._loop.run_in_executor(
            self._executor,
            functools.partial(
                self._outbox.open_index,
                self.settings.state_dir / "outbox-index.sqlite3",
                synchronous_full=self.settings.durability == "full",
            ),
        )
        self._accepting = True
        await self._recover_outputs()
        self._background.append(
            self._supervisor.spawn("hibernation", self._scheduler.hibernate_idle_forever)
        )
        self._on_started()
        logger.info(
            "agents: runtime started (%d classes, state in %s, durability=%s)",
            len(self.classes),
            self.settings.state_dir,
            self.settings.durability,
        )

    async def drain(self, timeout_s: float = 10.0) -> bool:
        """Stop accepting events (LinkRejected("shutting down")), finish queued turns and
        commit them. Returns False if some agent was still busy after `timeout_s`.

        First the agents' own tasks (`AgentHost.start_task`) are cancelled while turns are
        still accepted, so what they do on cancellation (a chat stream storing its end)
        commits too."""
        deadline = time.monotonic() + timeout_s
        if self._accepting:
            await self._stop_agent_tasks(timeout_s)
        self._accepting = False
        self._scheduler.open_every_room()  # held transports resubmit and get "shutting down"
        while True:
            tasks = self._scheduler.busy_tasks()
            if not tasks:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning("agents: drain timed out with %d agents still busy", len(tasks))
                return False
            await asyncio.wait(tasks, timeout=remaining)

    async def close(self) -> None:
        """Drain (if not done), then close every agent database and the commit executor.

        The closing steps run whatever happened before: a background loop that died, an agent
        task that raised or a drain that failed never leaves a database or the executor open.
        """
        if self._closed:
            return
        try:
            if self._accepting:
                await self.drain()
        finally:
            self._closed = True
            self._accepting = False
            for named in self._agent_tasks.values():  # any that outlived the drain
                for task in named.values():
                    task.cancel()
            try:
                await self._batches.disk.close()
                await self._stop_background()
            finally:
                try:
                    await self._scheduler.shut_down()
                    await self._settle_outputs_of_hibernated()
                finally:
                    if self._executor is not None:
                        self._executor.submit(self._outbox.close_index)
                        self._executor.shutdown(wait=True)
                    self._on_closed()
                    logger.info("agents: runtime closed")

    def _start_agent_task(
        self, key: AgentKey, name: str, coro: Coroutine[Any, Any, Any]
    ) -> asyncio.Task[Any]:
        tasks = self._agent_tasks.setdefault(key, {})
        running = tasks.get(name)
        if running is not None and not running.done():
            coro.close()
            raise AgentError(f"agent {key[0]}/{key[1]!r}: task {name!r} is already running")
        if self._closed or self._loop is None:
            coro.close()
            raise AgentError("AgentRuntime is not running: no new agent tasks")
        # A fresh context: the task belongs to no turn (it inherits none).
        task = self._loop.create_task(
            coro, name=f"agent {key[0]}/{key[1]}: {name}", context=contextvars.Context()
        )
        tasks[name] = task

        def finished(done: asyncio.Task[Any]) -> None:
            if tasks.get(name) is done:
                del tasks[name]
                if not tasks and self._agent_tasks.get(key) is tasks:
                    del self._agent_tasks[key]
            if not done.cancelled() and done.exception() is not None:
                logger.error(
                    "agents: %s/%r: task %s failed", key[0], key[1], name, exc_info=done.exception()
                )

        task.add_done_callback(finished)
        return task

    def _running_agent_task(self, key: AgentKey, name: str) -> asyncio.Task[Any] | None:
        task = self._agent_tasks.get(key, {}).get(name)
        return task if task is not None and not task.done() else None

    async def _stop_agent_tasks(self, timeout_s: float) -> None:
        """Cancel the agents' tasks and give them up to `timeout_s` to finish (drain())."""
        tasks = [task for named in self._agent_tasks.values() for task in named.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(timeout_s, 0.001))

    async def _stop_background(self) -> None:
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # close() itself was cancelled: the finally blocks still run
            except Exception:
                logger.exception(
                    "agents: background task %s had failed before shutdown", task.get_name()
                )

    def stats(self) -> dict[str, int]:
        return {
            **self._counters,
            "active_agents": self._scheduler.awake,
            "busy_agents": len(self._scheduler.busy_tasks()),
            "events_queued": self._scheduler.events_queued(),
            "connections_open": len(self._registry),
            "disk_full": int(self._batches.disk.full),
            "agents_quarantined": len(self._batches.quarantine),
        }

    def healthy(self) -> bool:
        """Started, not closed, every background loop running, and no commit stuck (a hung
        disk) for more than `turn_timeout_s`."""
        if self._loop is None or self._closed or self._committer is None:
            return False
        if self._supervisor.failing():
            return False
        stuck_s = self._committer.oldest_in_flight_s()
        if stuck_s > self.settings.turn_timeout_s:
            # Health is sampled twice a second: say it once per stuck episode, then every minute.
            now = time.monotonic()
            if now - self._stuck_logged_at >= _STUCK_LOG_INTERVAL_S:
                self._stuck_logged_at = now
                logger.error(
                    "agents: a commit has been running for %.1fs (disk stuck? check the state "
                    "directory's file system); reporting unhealthy",
                    stuck_s,
                )
            return False
        self._stuck_logged_at = -_STUCK_LOG_INTERVAL_S
        return True

    # -- LinkHandler ---------------------------------------------------------------------------

    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        route = link.route
        key = (route.agent_class, route.agent_id)
        future = self._new_future()
        rejection = self._check_route(key)
        if rejection is None and link.link_id in self._registry:
            rejection = f"link id {link.link_id!r} is already open"
        if rejection is not None:
            return self._reject(future, rejection, link)
        quarantined = self._batches.quarantine.refusal(key)
        if quarantined is not None:  # not registered: the transport may try again later
            future.set_exception(quarantined)
            return future
        if self._scheduler.mailbox_full(key):
            return self._hold_back(future, key)
        conn = Connection(link, context, self.settings.max_connection_state_bytes)
        self._registry.register(key, conn)
        slot = self._enqueue(key, Event(CONNECT, future, conn, context))
        conn._gate = slot
        return future

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        future = self._new_future()
        if not self._accepting:
            return self._reject(future, "shutting down", link, code=1001)
        disk_full = self._batches.disk.refusal()
        if disk_full is not None:
            raise disk_full  # nothing enqueued: the transport holds it until space is back
        conn = self._registry.get(link.link_id)
        if conn is None:
            route = link.route
            # A quarantined agent's link could not open: say why (not final: the message is
            # kept and retried, or dead-lettered by the transport), instead of a rejection.
            quarantined = self._batches.quarantine.refusal((route.agent_class, route.agent_id))
            if quarantined is not None:
                future.set_exception(quarantined)
                return future
            return self._reject(future, "connection is not open (open_link first)", link)
        size = len(data)  # chars for str: a cheap lower bound before encoding
        if size > self.settings.max_message_bytes or (
            isinstance(data, str)
            and size * 4 > self.settings.max_message_bytes
            and len(data.encode("utf-8")) > self.settings.max_message_bytes
        ):
            return self._reject(
                future,
                f"message larger than agents.max_message_bytes={self.settings.max_message_bytes}",
                link,
                code=1009,
            )
        route = link.route
        key = (route.agent_class, route.agent_id)
        if self._scheduler.mailbox_full(key):
            return self._hold_back(future, key)
        self._enqueue(key, Event(MESSAGE, future, conn, data, dedup))
        return future

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        future = self._new_future()
        conn = self._registry.get(link.link_id)
        if conn is None:
            future.set_result(Outcome.APPLIED)  # never opened, or already closed: nothing to do
            return future
        conn.closed = True  # the peer is gone: nothing more may be sent to it
        if not self._accepting:
            self._registry.unregister(conn)
            return self._reject(future, "shutting down", link, code=1001)
        route = link.route
        self._enqueue((route.agent_class, route.agent_id), Event(CLOSE, future, conn, code, reason))
        return future

    # -- durable outputs (protocols.link.OutputRecovery) ---------------------------------------

    def attach_outputs(self, outputs: DurableOutputs) -> None:
        """A transport with durable outputs started: it gets the outputs that waited for it
        (agents whose outputs were with a stopped transport are woken to read them again)."""
        for key in self._outbox.attach(outputs):
            if self._check_route(key) is None:
                self._enqueue(key, Event(FN, None, None, _wake_only))

    def detach_outputs(self, outputs: DurableOutputs) -> None:
        self._outbox.detach(outputs)

    async def _recover_outputs(self) -> None:
        """Wake every agent the outbox index lists: its first batch sends its undelivered
        outputs again (to transports that attach later, as soon as they attach)."""
        assert self._loop is not None
        keys = await self._loop.run_in_executor(self._executor, self._outbox.index.marked)
        self._outbox.recover(keys)
        for key in keys:
            if self._check_route(key) is not None:
                logger.warning(
                    "agents: %s/%r has undelivered outputs on disk but its class is not "
                    "configured; they stay there until it is",
                    *key,
                )
                continue
            self._enqueue(key, Event(FN, None, None, _wake_only))
        if keys:
            logger.info(
                "agents: %d agents have outputs left undelivered by the last run; sending them",
                len(keys),
            )

    async def _settle_outputs_of_hibernated(self) -> None:
        """Shutdown: delete the rows of outputs delivered after their agent hibernated (else
        the next start would send them again)."""
        if self._loop is None:
            return  # never started
        for key in self._outbox.needs_settling():
            settlement = self._outbox.settlement(key)
            if settlement is None:
                continue
            path = agent_db_file(str(self.settings.state_dir), key[0], key[1])
            try:
                await self._loop.run_in_executor(
                    self._executor, _settle_in_file, self._outbox, settlement, path
                )
            except Exception as err:
                logger.warning(
                    "agents: %s/%r: could not delete %d delivered outputs (%s); they are sent "
                    "again after the restart",
                    key[0],
                    key[1],
                    len(settlement.seqs),
                    err,
                )
                continue
            self._outbox.settled(settlement)

    # -- cluster mode (gatewayd/cluster) ------------------------------------------------------

    def set_replicator(self, replicator: Any) -> None:
        """Every batch's writes go through `replicator.before_commit` (batch.Replicator)."""
        self._batches.replicator = replicator

    def recover_outputs(self, keys: list[AgentKey]) -> None:
        """Cluster mode: these agents' databases were just restored from another member's
        changelog and may hold outputs it had not delivered: each is woken and its first batch
        sends them again (as `_recover_outputs` does at start-up)."""
        self._outbox.recover(keys)
        for key in keys:
            if self._check_route(key) is None:
                self._enqueue(key, Event(FN, None, None, _wake_only))

    async def release_agents(self, keys: list[AgentKey]) -> None:
        """Hand these agents over: close their connections (no close turn runs), forget their
        alarms (their new owner wakes them), wait for their running batches, hibernate them
        and wait until their files are closed."""
        for key in keys:
            if self._index is not None:
                self._index.set_next(key[0], key[1], None)
            for conn in list(self._registry.registered(key)):
                conn.closed = True
                self._registry.unregister(conn)
        for key in keys:
            slot = self._scheduler.slots.get(key)
            while slot is not None and slot.task is not None:
                await asyncio.wait([slot.task])
                slot = self._scheduler.slots.get(key)
            if slot is not None and slot.agent is not None:
                self._scheduler.evict(slot, count=False)
            await self._scheduler.wait_for_close(key)

    # -- in-process API -------------------------------------------------------------------------

    def submit_call(
        self, agent_class: str, agent_id: str, method: str, *args: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """Enqueue a call of the `@callable` `method`; the future resolves to its return value
        after the turn committed. It fails at once with `MailboxFullError` when the agent's
        mailbox (`max_mailbox_events`) or the pending calls (`max_pending_calls`) are full."""
        return self._submit(
            Event(CALL, self._new_future(), None, method, args, kwargs), agent_class, agent_id
        )

    async def call(
        self, agent_class: str, agent_id: str, method: str, *args: Any, **kw: Any
    ) -> Any:
        return await self.submit_call(agent_class, agent_id, method, *args, **kw)

    async def run_in_agent(
        self, agent_class: str, agent_id: str, fn: Callable[[Agent], Any]
    ) -> Any:
        """Run `fn(agent)` as a turn (it may use `agent.sql`, `set_state`...). For tests, tools."""
        return await self._submit(Event(FN, self._new_future(), None, fn), agent_class, agent_id)

    async def get_agent_state(self, agent_class: str, agent_id: str) -> Any:
        """The agent's committed state (wakes it if it is hibernating)."""
        return await self.run_in_agent(agent_class, agent_id, lambda agent: agent.state)

    def add_state_observer(self, observer: StateObserver) -> Callable[[], None]:
        """Call `observer(agent_class, agent_id, state)` after each commit that changed an
        agent's state (once per commit, with the committed state; a turn that rolled back its
        change may still report the unchanged state). It runs on the event loop and must not
        block or raise (errors are logged). Returns a function that removes it."""
        self._state_observers.append(observer)

        def remove() -> None:
            if observer in self._state_observers:
                self._state_observers.remove(observer)

        return remove

    def open_connections(self) -> list[tuple[AgentKey, Connection]]:
        """Every open connection with its agent's key (devices, dashboards), any transport."""
        return self._registry.all_open()

    def is_awake(self, agent_class: str, agent_id: str) -> bool:
        return self._scheduler.is_awake((agent_class, agent_id))

    def awake_agents(self) -> list[tuple[str, str]]:
        """The (class, id) of every agent in memory now (a read-only view, e.g. dashboards)."""
        return [key for key, slot in self._scheduler.slots.items() if slot.agent is not None]

    def hibernate_idle(self, idle_for_s: float = 0.0) -> int:
        """Evict every idle agent idle for at least `idle_for_s` now; returns how many."""
        return self._scheduler.evict_idle(self._scheduler.now() - idle_for_s)

    def _committed(self, slot: Slot) -> None:
        self._after_commit(slot)
        if slot.state_changed:
            slot.state_changed = False
            for observer in list(self._state_observers):
                try:
                    observer(slot.key[0], slot.key[1], slot.state)
                except Exception:
                    logger.exception("agents: a state observer failed")

    # -- enqueueing ----------------------------------------------------------------------------

    def _submit(self, event: Event, agent_class: str, agent_id: str) -> asyncio.Future[Any]:
        """Enqueue an in-process call (CALL or FN) within the mailbox and pending-call bounds."""
        future = event.future
        assert future is not None
        key = (agent_class, agent_id)
        rejection = self._check_route(key)
        if rejection is not None:
            return self._reject(future, rejection, None)
        if self._pending_calls >= self.settings.max_pending_calls:
            self._counters["mailbox_full_total"] += 1
            MAILBOX_FULL.inc()
            future.set_exception(
                MailboxFullError(
                    f"{self._pending_calls} calls are already waiting for agents "
                    f"(agents.max_pending_calls={self.settings.max_pending_calls}); "
                    "retry later or raise the limit"
                )
            )
            return future
        if self._scheduler.mailbox_full(key):
            self._counters["mailbox_full_total"] += 1
            MAILBOX_FULL.inc()
            future.set_exception(
                MailboxFullError(
                    f"agent {agent_class}/{agent_id!r}: mailbox full "
                    f"(agents.max_mailbox_events={self.settings.max_mailbox_events}); "
                    "retry later or raise the limit"
                )
            )
            return future
        self._pending_calls += 1
        future.add_done_callback(self._call_settled)
        self._enqueue(key, event)
        return future

    def _call_settled(self, _future: asyncio.Future[Any]) -> None:
        self._pending_calls -= 1

    def _hold_back(self, future: asyncio.Future[Any], key: AgentKey) -> asyncio.Future[Any]:
        """Fail `future` with Backpressure: nothing was queued; resubmit once `ready`."""
        self._counters["mailbox_full_total"] += 1
        MAILBOX_FULL.inc()
        future.set_exception(
            Backpressure(
                f"agent {key[0]}/{key[1]!r}: mailbox full "
                f"(agents.max_mailbox_events={self.settings.max_mailbox_events})",
                self._scheduler.when_room(key),
            )
        )
        return future

    def _new_future(self) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            raise AgentError("AgentRuntime is not started: await runtime.start() first")
        return loop.create_future()

    def _check_route(self, key: AgentKey) -> str | None:
        if not self._accepting:
            return "shutting down"
        if key[0] not in self.classes:
            return f"unknown agent class {key[0]!r}"
        try:
            validate_agent_id(key[1])
        except ValueError as err:
            return f"bad agent id: {err}"
        return None

    def _reject(
        self, future: asyncio.Future[Any], reason: str, link: Link | None, code: int = 1008
    ) -> asyncio.Future[Any]:
        self._counters["rejected_total"] += 1
        if link is not None:
            logger.info(
                "agents: rejected event from %s %s: %s", link.transport, link.remote, reason
            )
        future.set_exception(LinkRejected(reason, code=1001 if reason == "shutting down" else code))
        return future

    # -- what alarms.py (the mixin) uses ---------------------------------------------------------

    def _enqueue(self, key: AgentKey, event: Event) -> Slot:
        return self._scheduler.enqueue(key, event)

    async def _turn(
        self,
        slot: Slot,
        event: Event,
        done: list[Done],
        undo: list[tuple[Connection, Any]],
        *,
        report: bool = True,
    ) -> BaseException | None:
        return await self._turns.run(slot, event, done, undo, report=report)

    async def _on_error_turn(self, slot: Slot, err: BaseException) -> None:
        await self._turns.on_error_turn(slot, err)

    def _db_for_turn(self, slot: Slot) -> AgentDatabase:
        return self._turns.db_for_turn(slot)

    async def _infer(self, model: str, inputs: Any, **kwargs: Any) -> Any:
        if self.engine is None:
            raise NoEngineError(
                f"infer({model!r}): this gateway has no inference engine configured"
            )
        return await self.engine.infer(model, inputs, **kwargs)

    async def _infer_many(self, model: str, requests: Sequence[Any], **kwargs: Any) -> list[Any]:
        if self.engine is None:
            raise NoEngineError(
                f"infer_many({model!r}): this gateway has no inference engine configured"
            )
        infer_many = getattr(self.engine, "infer_many", None)
        if infer_many is None:  # a duck-typed engine with `infer` only
            return list(
                await asyncio.gather(*(self.engine.infer(model, r, **kwargs) for r in requests))
            )
        return list(await infer_many(model, requests, **kwargs))

    def _generate(self, prompt: Any, model: str | None, sampling: dict[str, Any]) -> Any:
        from gatewayd.generation import Generation, GenerationError, pick_generator

        try:
            name, generator = pick_generator(self.generators, model)
        except GenerationError as err:
            raise NoEngineError(f"generate(model={model!r}): {err}") from None
        return Generation(generator, name, prompt, **sampling)


def _wake_only(agent: Agent) -> None:
    """A turn that only wakes its agent (its batch sends outputs left by the last run)."""


def _settle_in_file(outbox: Outbox, settlement: Settlement, path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        outbox.settle(settlement, conn)
    finally:
        conn.close()


class _AgentHandle:
    """The `AgentHost` of one agent instance: the runtime as that agent sees it."""

    __slots__ = ("_runtime", "_slot")

    def __init__(self, runtime: AgentRuntime, slot: Slot) -> None:
        self._runtime = runtime
        self._slot = slot

    @property
    def key(self) -> tuple[str, str]:
        return self._slot.key

    @property
    def state(self) -> Any:
        return self._slot.state

    @property
    def engine(self) -> Any:
        return self._runtime.engine

    @property
    def runtime(self) -> AgentRuntime:
        return self._runtime

    def set_state(self, new_state: Any, source: Connection | str) -> None:
        self._runtime._turns.set_state(self._slot, new_state, source)

    def database(self) -> AgentDatabase:
        return self._runtime._turns.db_for_turn(self._slot)

    def connections(self) -> list[Connection]:
        return self._runtime._registry.open_of(self._slot.key)

    def schedule(self, when: Any, method: str, payload: Any, **options: Any) -> Any:
        return self._runtime._schedule(self._slot, when, method, payload, **options)

    def schedules(self) -> ScheduleStore:
        return self._runtime._schedules(self._slot)

    def cancel_schedule(self, schedule_id: str) -> bool:
        return self._runtime._cancel_schedule(self._slot, schedule_id)

    def queue_push(self, method: str, payload: Any, **options: Any) -> Any:
        return self._runtime._queue_push(self._slot, method, payload, **options)

    def queue(self) -> QueueStore:
        return self._runtime._queue(self._slot)

    async def retry(self, fn: Callable[[], Awaitable[Any] | Any], **options: Any) -> Any:
        return await self._runtime._retry(fn, **options)

    def request_destroy(self) -> None:
        self._runtime._turns.request_destroy(self._slot)

    def protocol_default(self, transport: str) -> bool:
        return self._runtime.settings.protocol_default(transport)

    async def infer(self, model: str, inputs: Any, **kwargs: Any) -> Any:
        return await self._runtime._infer(model, inputs, **kwargs)

    async def infer_many(self, model: str, requests: Sequence[Any], **kwargs: Any) -> list[Any]:
        return await self._runtime._infer_many(model, requests, **kwargs)

    def generate(self, prompt: Any, model: str | None, sampling: dict[str, Any]) -> Any:
        return self._runtime._generate(prompt, model, sampling)

    def submit(self, fn: Callable[[Agent], Any]) -> asyncio.Future[Any]:
        runtime = self._runtime
        return runtime._submit(Event(FN, runtime._new_future(), None, fn), *self._slot.key)

    def start_task(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self._runtime._start_agent_task(self._slot.key, name, coro)

    def running_task(self, name: str) -> asyncio.Task[Any] | None:
        return self._runtime._running_agent_task(self._slot.key, name)
