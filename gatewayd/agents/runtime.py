"""`AgentRuntime`: runs agents, one turn at a time each, behind the output gate.

It implements `protocols.link.LinkHandler`: transports call `open_link`, `submit_message` and
`close_link`, which enqueue an event for the route's agent synchronously and return a future
resolved only after the turn that consumed the event has committed.

How one agent runs (its `_Slot`): a task drains the agent's FIFO mailbox in *batches*. A
batch is one SQLite transaction; every event in it is its own turn inside a SAVEPOINT, so a
failing turn rolls back only itself. Outputs of every turn (sends, broadcasts, RPC replies,
closes, and the transport's futures) are buffered and released only after the batch's COMMIT.
No fsync ever runs on the event loop: with durability="full" the COMMIT (which fsyncs) runs on
a small shared executor, grouped with the commits of other agents that finished in the same
loop iteration (committer.py; never a thread per agent); with "normal" the COMMIT does not
fsync and runs inline, and the WAL checkpoints (which do) run on that executor at the end of
the agent's commit path (storage.py). Different agents run concurrently on the one event loop.

Idle agents hibernate (SQLite closed, instance dropped) after `hibernate_after_s`, and the
least recently used are evicted beyond `max_active_agents`; their connections stay with the
runtime and the next event wakes the agent (`on_start` runs again).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import inspect
import itertools
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from gatewayd.agents.agent import Agent, RpcStream, callable_info
from gatewayd.agents.alarms import AlarmsMixin
from gatewayd.agents.committer import GroupCommitter
from gatewayd.agents.connection import CloseRequest, Connection, deliver
from gatewayd.agents.errors import (
    AgentError,
    CommitError,
    NoEngineError,
    NotInTurnError,
    ReadonlyConnectionError,
    RpcError,
    SequenceGapError,
    StateRejectedError,
    TurnTimeoutError,
)
from gatewayd.agents.memory import release_free_memory
from gatewayd.agents.settings import AgentSettings
from gatewayd.agents.storage import AgentDatabase, validate_agent_id, validate_class_name
from protocols import jsonproto
from protocols.link import DedupKey, Link, LinkRejected, Outcome

logger = logging.getLogger(__name__)

TURNS = Counter("gatewayd_agent_turns_total", "Agent turns run, by result", ["result"])
_TURNS_OK = TURNS.labels("ok")  # cached children: labels() per turn is measurable
_TURNS_ERROR = TURNS.labels("error")
COMMITS = Counter("gatewayd_agent_commits_total", "Agent transactions committed")
COMMIT_ERRORS = Counter("gatewayd_agent_commit_errors_total", "Agent commits that failed")
WAKES = Counter("gatewayd_agent_wakes_total", "Agents woken from hibernation or first start")
HIBERNATIONS = Counter("gatewayd_agent_hibernations_total", "Agents evicted from memory")
ACTIVE = Gauge("gatewayd_agents_active", "Agents currently in memory")
COMMIT_SECONDS = Histogram(
    "gatewayd_agent_commit_group_seconds",
    "Time to commit one group of agent transactions on one commit thread "
    "(includes the fsyncs with durability=full)",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
)

AgentKey = tuple[str, str]

# Return freed memory to the OS once this many agents were evicted (see memory.py).
_TRIM_AFTER_EVICTIONS = 100

# Event kinds
_START, _CONNECT, _MESSAGE, _CLOSE, _CALL, _FN, _ALARM, _SCHEDULED = range(8)
_EVENT_NAMES = ("start", "connect", "message", "close", "call", "fn", "alarm", "scheduled call")


class _Event:
    __slots__ = ("a", "b", "c", "conn", "future", "kind")

    def __init__(
        self,
        kind: int,
        future: asyncio.Future[Any] | None,
        conn: Connection | None = None,
        a: Any = None,
        b: Any = None,
        c: Any = None,
    ) -> None:
        self.kind = kind
        self.future = future
        self.conn = conn
        self.a = a
        self.b = b
        self.c = c


class _TransactionLost(Exception):
    """The batch's transaction no longer exists; its turns must all fail."""


class _Turn:
    """What one running turn may change besides SQL (undone when it rolls back)."""

    __slots__ = (
        "conn_undo",
        "destroy",
        "notifications",
        "readonly",
        "rpc_conn",
        "rpc_id",
        "source",
        "woke_queue",
    )

    def __init__(self, source: Connection | None) -> None:
        self.source = source
        self.conn_undo: list[tuple[Connection, Any]] = []
        self.notifications: list[Any] = []
        self.readonly = False
        self.rpc_id: str | None = None
        self.rpc_conn: Connection | None = None
        self.destroy = False
        self.woke_queue = False


class _Slot:
    """One agent identity while it is awake or has events queued."""

    __slots__ = (
        "agent",
        "cls",
        "db",
        "destroy_requested",
        "drain_queued",
        "index_dirty",
        "key",
        "last_active",
        "mailbox",
        "outbox",
        "state",
        "stores",
        "task",
        "turn",
    )

    def __init__(self, key: AgentKey, cls: type[Agent]) -> None:
        self.key = key
        self.cls = cls
        self.mailbox: deque[_Event] = deque()
        self.task: asyncio.Task[None] | None = None
        self.agent: Agent | None = None
        self.db: AgentDatabase | None = None
        self.state: Any = None
        self.turn: _Turn | None = None
        self.outbox: list[tuple[Connection, Any]] | None = None
        self.last_active = 0.0
        self.destroy_requested = False
        self.drain_queued = False
        self.index_dirty = False
        self.stores: dict[str, Any] = {}


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(Agent, name)


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
        self._slots: OrderedDict[AgentKey, _Slot] = OrderedDict()
        self._conns: dict[str, Connection] = {}
        self._conns_by_agent: dict[AgentKey, dict[str, Connection]] = {}
        self._closing: dict[AgentKey, asyncio.Future[None]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._committer: GroupCommitter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: list[asyncio.Task[None]] = []
        self._accepting = False
        self._closed = False
        self._awake = 0
        self._evicted_since_trim = 0
        self._signatures: dict[Any, inspect.Signature] = {}
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "turns_total",
                "turn_errors",
                "turn_timeouts",
                "commits_total",
                "commit_errors",
                "wakes_total",
                "hibernations_total",
                "duplicates_total",
                "protocol_errors",
                "rejected_total",
            ),
            0,
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
        self._accepting = True
        self._background.append(self._loop.create_task(self._hibernate_idle_forever()))
        self._on_started()
        logger.info(
            "agents: runtime started (%d classes, state in %s, durability=%s)",
            len(self.classes),
            self.settings.state_dir,
            self.settings.durability,
        )

    async def drain(self, timeout_s: float = 10.0) -> bool:
        """Stop accepting events (LinkRejected("shutting down")), finish queued turns and
        commit them. Returns False if some agent was still busy after `timeout_s`."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while True:
            tasks = [slot.task for slot in self._slots.values() if slot.task is not None]
            if not tasks:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning("agents: drain timed out with %d agents still busy", len(tasks))
                return False
            await asyncio.wait(tasks, timeout=remaining)

    async def close(self) -> None:
        """Drain (if not done), then close every agent database and the commit executor."""
        if self._closed:
            return
        if self._accepting:
            await self.drain()
        self._closed = True
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        for slot in list(self._slots.values()):
            if slot.task is not None:
                slot.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await slot.task
            for event in slot.mailbox:
                _fail(event.future, LinkRejected("shutting down", code=1001))
            slot.mailbox.clear()
            if slot.agent is not None:
                self._evict(slot)
        if self._closing:
            await asyncio.gather(*self._closing.values(), return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._on_closed()
        logger.info("agents: runtime closed")

    def stats(self) -> dict[str, int]:
        return {
            **self._counters,
            "active_agents": self._awake,
            "busy_agents": sum(1 for slot in self._slots.values() if slot.task is not None),
            "events_queued": sum(len(slot.mailbox) for slot in self._slots.values()),
            "connections_open": len(self._conns),
        }

    def healthy(self) -> bool:
        """Started, not closed, and no commit stuck (a hung disk) for more than
        `turn_timeout_s`."""
        if self._loop is None or self._closed or self._committer is None:
            return False
        stuck_s = self._committer.oldest_in_flight_s()
        if stuck_s > self.settings.turn_timeout_s:
            logger.error("agents: a commit has been running for %.1fs (disk stuck?)", stuck_s)
            return False
        return True

    # -- LinkHandler ---------------------------------------------------------------------------

    def open_link(self, link: Link, context: dict[str, Any]) -> asyncio.Future[Outcome]:
        route = link.route
        key = (route.agent_class, route.agent_id)
        future = self._new_future()
        rejection = self._check_route(key)
        if rejection is None and link.link_id in self._conns:
            rejection = f"link id {link.link_id!r} is already open"
        if rejection is not None:
            return self._reject(future, rejection, link)
        conn = Connection(link, context, self.settings.max_connection_state_bytes)
        self._conns[link.link_id] = conn
        self._conns_by_agent.setdefault(key, {})[link.link_id] = conn
        slot = self._enqueue(key, _Event(_CONNECT, future, conn, context))
        conn._slot = slot
        return future

    def submit_message(
        self, link: Link, data: bytes | str, dedup: DedupKey | None = None
    ) -> asyncio.Future[Outcome]:
        future = self._new_future()
        if not self._accepting:
            return self._reject(future, "shutting down", link, code=1001)
        conn = self._conns.get(link.link_id)
        if conn is None:
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
        self._enqueue(
            (route.agent_class, route.agent_id), _Event(_MESSAGE, future, conn, data, dedup)
        )
        return future

    def close_link(self, link: Link, code: int, reason: str) -> asyncio.Future[Outcome]:
        future = self._new_future()
        conn = self._conns.get(link.link_id)
        if conn is None:
            future.set_result(Outcome.APPLIED)  # never opened, or already closed: nothing to do
            return future
        conn.closed = True  # the peer is gone: nothing more may be sent to it
        if not self._accepting:
            self._unregister(conn)
            return self._reject(future, "shutting down", link, code=1001)
        route = link.route
        self._enqueue(
            (route.agent_class, route.agent_id), _Event(_CLOSE, future, conn, code, reason)
        )
        return future

    # -- in-process API -------------------------------------------------------------------------

    def submit_call(
        self, agent_class: str, agent_id: str, method: str, *args: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """Enqueue a call of the `@callable` `method`; the future resolves to its return value
        after the turn committed."""
        future = self._new_future()
        key = (agent_class, agent_id)
        rejection = self._check_route(key)
        if rejection is not None:
            return self._reject(future, rejection, None)
        self._enqueue(key, _Event(_CALL, future, None, method, args, kwargs))
        return future

    async def call(
        self, agent_class: str, agent_id: str, method: str, *args: Any, **kw: Any
    ) -> Any:
        return await self.submit_call(agent_class, agent_id, method, *args, **kw)

    async def run_in_agent(
        self, agent_class: str, agent_id: str, fn: Callable[[Agent], Any]
    ) -> Any:
        """Run `fn(agent)` as a turn (it may use `agent.sql`, `set_state`...). For tests, tools."""
        future = self._new_future()
        key = (agent_class, agent_id)
        rejection = self._check_route(key)
        if rejection is not None:
            return await self._reject(future, rejection, None)
        self._enqueue(key, _Event(_FN, future, None, fn))
        return await future

    async def get_agent_state(self, agent_class: str, agent_id: str) -> Any:
        """The agent's committed state (wakes it if it is hibernating)."""
        return await self.run_in_agent(agent_class, agent_id, lambda agent: agent.state)

    def is_awake(self, agent_class: str, agent_id: str) -> bool:
        slot = self._slots.get((agent_class, agent_id))
        return slot is not None and slot.agent is not None

    def hibernate_idle(self, idle_for_s: float = 0.0) -> int:
        """Evict every idle agent idle for at least `idle_for_s` now; returns how many."""
        return self._evict_idle(self._now() - idle_for_s)

    # -- enqueueing ----------------------------------------------------------------------------

    def _new_future(self) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            raise AgentError("AgentRuntime is not started: await runtime.start() first")
        return loop.create_future()

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

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

    def _enqueue(self, key: AgentKey, event: _Event) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = _Slot(key, self.classes[key[0]])
            self._slots[key] = slot
        slot.mailbox.append(event)
        if slot.task is None:
            assert self._loop is not None
            slot.task = self._loop.create_task(self._run(slot))
        return slot

    # -- the agent loop --------------------------------------------------------------------------

    async def _run(self, slot: _Slot) -> None:
        try:
            while slot.mailbox:
                await self._run_batch(slot)
                if slot.destroy_requested:
                    break
                if slot.mailbox:
                    # An inline commit does not yield: let other agents and the transports
                    # run between batches.
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in the runtime itself: keep the gateway serving, reload this agent.
            logger.exception("agents: %s/%r: internal error; reloading agent", *slot.key)
            for event in slot.mailbox:
                _fail(event.future, AgentError("internal error in the agent runtime"))
            slot.mailbox.clear()
            if slot.agent is not None:
                self._evict(slot)
        finally:
            slot.task = None
            slot.last_active = self._now()
        if slot.destroy_requested:
            await self._destroy(slot)
            return
        if slot.mailbox:  # events arrived while tearing down
            slot.task = asyncio.get_running_loop().create_task(self._run(slot))
            return
        if self._slots.get(slot.key) is slot:
            if slot.agent is None:
                del self._slots[slot.key]  # nothing in memory: forget it
            else:
                self._slots.move_to_end(slot.key)
                if self._awake > self.settings.max_active_agents:
                    self._evict_lru()

    async def _run_batch(self, slot: _Slot) -> None:
        outbox: list[tuple[Connection, Any]] = []
        done: list[tuple[asyncio.Future[Any] | None, Any, bool]] = []
        undo_conns: list[tuple[Connection, Any]] = []
        slot.outbox = outbox
        try:
            if slot.agent is None and not await self._wake(slot, done, undo_conns):
                return
            db = slot.db
            assert db is not None
            db.begin()
            mailbox = slot.mailbox
            budget = self.settings.max_turns_per_commit
            try:
                while mailbox and budget > 0:
                    budget -= 1
                    event = mailbox.popleft()
                    if event.kind == _ALARM:
                        await self._run_alarm(slot, done, undo_conns)
                    else:
                        await self._turn(slot, event, done, undo_conns)
                    if slot.destroy_requested:
                        break
            except _TransactionLost as lost:
                await self._abort_batch(slot, str(lost), done, outbox, undo_conns)
                return
            except Exception as err:
                logger.exception("agents: %s/%r: internal error in a turn", *slot.key)
                await self._abort_batch(
                    slot, f"internal error ({type(err).__name__}: {err})", done, outbox, undo_conns
                )
                return
            await self._commit(slot, db, outbox, done, undo_conns)
        finally:
            slot.outbox = None

    async def _commit(
        self,
        slot: _Slot,
        db: AgentDatabase,
        outbox: list[tuple[Connection, Any]],
        done: list[tuple[asyncio.Future[Any] | None, Any, bool]],
        undo_conns: list[tuple[Connection, Any]],
    ) -> None:
        assert self._loop is not None
        assert self._committer is not None
        try:
            if db.commit_fsyncs:
                await self._committer.commit(db)
            else:
                # durability="normal": this COMMIT never fsyncs (storage.py), so it runs
                # inline; a thread hand-off would cost more than the commit itself.
                db.commit()
        except Exception as err:
            self._counters["commit_errors"] += 1
            COMMIT_ERRORS.inc()
            await self._abort_batch(
                slot, f"commit failed ({type(err).__name__}: {err})", done, outbox, undo_conns
            )
            return
        self._counters["commits_total"] += 1
        COMMITS.inc()
        for conn, data in outbox:
            try:
                deliver(conn, data)
            except Exception:
                logger.exception("agents: transport failed to take output for %r", conn)
        for future, result, is_error in done:
            if future is None or future.done():
                continue
            if is_error:
                future.set_exception(result)
            else:
                future.set_result(result)
        self._after_commit(slot)
        if db.needs_checkpoint():
            # The outputs are already released (a checkpoint adds no durability against a
            # process crash); the agent stays busy until it returns, so nothing else uses the
            # connection meanwhile.
            try:
                await self._loop.run_in_executor(self._executor, db.checkpoint)
            except Exception as err:
                logger.warning(
                    "agents: %s/%r: WAL checkpoint failed (retried after more commits): %s",
                    slot.key[0],
                    slot.key[1],
                    err,
                )

    async def _abort_batch(
        self,
        slot: _Slot,
        why: str,
        done: list[tuple[asyncio.Future[Any] | None, Any, bool]],
        outbox: list[tuple[Connection, Any]],
        undo_conns: list[tuple[Connection, Any]],
    ) -> None:
        """The batch's transaction is lost: nothing of it may leave or be acknowledged."""
        error = CommitError(
            f"agent {slot.key[0]}/{slot.key[1]!r}: {why}; {len(outbox)} outputs dropped, "
            f"{len(done)} events not acknowledged, agent reloaded from disk"
        )
        logger.error("agents: %s", error)
        for conn, old_state in reversed(undo_conns):
            conn._state = old_state
        for future, result, is_error in done:
            _fail(future, result if is_error else error)
        self._drop_failed_connects(done, error)
        agent = slot.agent
        if agent is not None:
            self._evict(slot, count=False)
            await self._notify_error_outside_turn(agent, error)

    def _drop_failed_connects(
        self, done: list[tuple[Any, Any, bool]], error: BaseException
    ) -> None:
        """Connections whose connect turn did not commit are not open: close them."""
        for future, _result, _is_error in done:
            conn = getattr(future, "_gw_connecting", None)
            if conn is not None:
                self._unregister(conn)
                if not conn.closed:
                    conn.closed = True
                    conn.link.close(1011, "agent could not accept the connection")

    async def _wake(
        self, slot: _Slot, done: list[Any], undo_conns: list[tuple[Connection, Any]]
    ) -> bool:
        closing = self._closing.get(slot.key)
        if closing is not None:
            await asyncio.shield(closing)
        settings = self.settings
        try:
            # Opening touches the file system (creating -wal/-shm files, a new database's
            # header): off the loop, on the shared executor.
            assert self._loop is not None
            db = await self._loop.run_in_executor(
                self._executor,
                functools.partial(
                    AgentDatabase.open,
                    settings.state_dir,
                    slot.key[0],
                    slot.key[1],
                    durability=settings.durability,
                    max_db_bytes=settings.max_db_bytes,
                    max_value_bytes=settings.max_value_bytes,
                ),
            )
        except Exception as err:
            logger.error("agents: cannot wake %s/%r: %s", slot.key[0], slot.key[1], err)
            self._alarm_pending.discard(slot.key)
            for event in slot.mailbox:
                _fail(event.future, err)
            slot.mailbox.clear()
            return False
        db.begin()
        found, state = db.load_state()
        if not found:
            state = copy.deepcopy(slot.cls.initial_state)
        agent = slot.cls.__new__(slot.cls)
        agent._gw_runtime = self
        agent._gw_slot = slot
        slot.agent = agent
        slot.db = db
        slot.state = state
        slot.stores = {}
        self._awake += 1
        ACTIVE.set(self._awake)
        self._counters["wakes_total"] += 1
        WAKES.inc()
        for conn in self._conns_by_agent.get(slot.key, {}).values():
            conn._slot = slot
        if slot.cls.__init__ is not object.__init__:
            slot.cls.__init__(agent)
        await self._turn(slot, _Event(_START, None), done, undo_conns)
        self._after_wake(slot)
        if self._awake > settings.max_active_agents:
            self._evict_lru()
        return True

    async def _turn(
        self,
        slot: _Slot,
        event: _Event,
        done: list[tuple[asyncio.Future[Any] | None, Any, bool]],
        undo_conns: list[tuple[Connection, Any]],
        *,
        report: bool = True,
    ) -> BaseException | None:
        """Run one event as a turn in its own SAVEPOINT; returns its error (rolled back)."""
        db = slot.db
        assert db is not None and slot.outbox is not None
        kind = event.kind
        dedup: DedupKey | None = event.b if kind == _MESSAGE else None
        if dedup is not None:
            last = db.last_seq(dedup.stream)
            if last is not None and dedup.seq <= last:
                self._counters["duplicates_total"] += 1
                done.append((event.future, Outcome.DUPLICATE, False))
                return None
            if last is not None and dedup.seq > last + 1 and dedup.seq > dedup.resume_seq:
                # An earlier seq of this stream is still unapplied (its turn failed while this
                # one was in flight): applying this one now would make that one look like a
                # retransmission later and lose it. The sender resends both, in order.
                # Seqs below the sender's declared resume_seq are never coming: not a gap.
                done.append((event.future, SequenceGapError(dedup, last), True))
                return None
        turn = _Turn(event.conn)
        slot.turn = turn
        if kind == _CONNECT and event.future is not None:
            # If the batch is lost, `_drop_failed_connects` finds the connection here.
            event.future._gw_connecting = event.conn  # type: ignore[attr-defined]
        state_before = slot.state
        outbox = slot.outbox
        outbox_mark = len(outbox)
        timeout_cm: asyncio.Timeout | None = None
        db.savepoint()
        try:
            result = self._dispatch(slot, event, turn)
            if result is not None and inspect.isawaitable(result):
                timeout_cm = asyncio.timeout(self.settings.turn_timeout_s)
                async with timeout_cm:
                    result = await result
            for note in turn.notifications:
                await self._notify_state_changed(slot, note)
            if dedup is not None:
                db.set_last_seq(dedup.stream, dedup.seq)
            db.release()
        except Exception as raised:
            err: BaseException = raised
            if timeout_cm is not None and timeout_cm.expired():
                err = TurnTimeoutError(
                    f"agent {slot.key[0]}/{slot.key[1]!r}: {_EVENT_NAMES[kind]} handler did not "
                    f"finish within agents.turn_timeout_s={self.settings.turn_timeout_s}s; "
                    "turn rolled back"
                )
                self._counters["turn_timeouts"] += 1
            del outbox[outbox_mark:]
            slot.state = state_before
            slot.turn = None
            slot.stores.clear()  # a store created in this turn may have lost its tables
            if not db.connection.in_transaction:
                # SQLite rolled back the whole transaction (SQLITE_FULL, IOERR...): the
                # earlier turns of this batch are gone too.
                for conn, old_state in reversed(turn.conn_undo):
                    conn._state = old_state
                self._counters["turn_errors"] += 1
                done.append((event.future, err, True))
                raise _TransactionLost(
                    f"transaction rolled back by SQLite in a {_EVENT_NAMES[kind]} turn "
                    f"({type(err).__name__}: {err})"
                ) from err
            db.rollback_to_savepoint()
            if dedup is not None and isinstance(err, LinkRejected):
                # The agent will never accept this message: its seq counts as consumed, or
                # every later seq of the stream would wait behind it forever.
                db.set_last_seq(dedup.stream, dedup.seq)
            for conn, old_state in reversed(turn.conn_undo):
                conn._state = old_state
            slot.turn = None
            self._counters["turn_errors"] += 1
            _TURNS_ERROR.inc()
            self._report_turn_error(slot, event, turn, err)
            done.append((event.future, err, True))
            if kind == _CONNECT and event.future is not None:
                self._refuse_connection(event.conn, err)
            if report:
                await self._on_error_turn(slot, err)
            return err
        except BaseException:
            if db.connection.in_transaction:
                db.rollback_to_savepoint()
            del outbox[outbox_mark:]
            slot.state = state_before
            raise
        finally:
            slot.turn = None
        undo_conns.extend(turn.conn_undo)
        if turn.destroy:
            slot.destroy_requested = True
        self._counters["turns_total"] += 1
        _TURNS_OK.inc()
        if event.future is not None:
            if kind in (_CALL, _FN):
                done.append((event.future, result, False))
            else:
                done.append((event.future, Outcome.APPLIED, False))
        return None

    # -- dispatching one event ----------------------------------------------------------------

    def _dispatch(self, slot: _Slot, event: _Event, turn: _Turn) -> Any:
        agent = slot.agent
        assert agent is not None
        kind = event.kind
        if kind == _MESSAGE:
            conn = event.conn
            assert conn is not None
            data = event.a
            if type(data) is str:
                try:
                    frame = jsonproto.parse_client_text(data)
                except jsonproto.ProtocolError as err:
                    self._counters["protocol_errors"] += 1
                    if err.rpc_id is not None:
                        conn.send(jsonproto.encode_rpc_error(err.rpc_id, str(err)))
                    else:
                        conn.send(jsonproto.encode_error(str(err)))
                    return None
                if frame is not None:
                    if isinstance(frame, jsonproto.RpcRequest):
                        return self._rpc(slot, agent, conn, frame, turn)
                    return self._client_state_update(slot, conn, frame.state, turn)
            return agent.on_message(conn, data)
        if kind == _CONNECT:
            return self._connect(slot, agent, event.conn, event.a)
        if kind == _CLOSE:
            conn = event.conn
            assert conn is not None
            self._unregister(conn)
            return agent.on_close(conn, event.a, event.b)
        if kind == _CALL:
            method = self._callable(agent, event.a)
            self._check_arguments(method, event.a, event.b, event.c)
            return method(*event.b, **event.c)
        if kind == _START:
            return agent.on_start()
        if kind == _FN:
            return event.a(agent)
        if kind == _SCHEDULED:
            return self._named_method(agent, event.a)(event.b)
        raise AgentError(f"event kind {_EVENT_NAMES[kind]} is not supported")

    async def _connect(
        self, slot: _Slot, agent: Agent, conn: Connection | None, context: dict[str, Any]
    ) -> None:
        assert conn is not None
        # Asked before anything is sent to the connection; the flags live on the Connection,
        # outside the agent instance, so they survive hibernation.
        conn.protocol_enabled = bool(
            await _maybe_await(agent.should_send_protocol_messages(conn, context))
        )
        conn.readonly = bool(await _maybe_await(agent.should_connection_be_readonly(conn, context)))
        conn._set_tags(await _maybe_await(agent.get_connection_tags(conn, context)) or ())
        if conn.protocol_enabled:
            conn.send(jsonproto.encode_identity(slot.key[0], slot.key[1], conn.id))
            conn.send(jsonproto.encode_state(slot.state))
        await _maybe_await(agent.on_connect(conn, context))

    def _refuse_connection(self, conn: Connection | None, err: BaseException) -> None:
        if conn is None:
            return
        self._unregister(conn)
        code = err.code if isinstance(err, LinkRejected) else 1011
        reason = err.reason if isinstance(err, LinkRejected) else "agent refused the connection"
        assert conn._slot is not None and conn._slot.outbox is not None
        conn._slot.outbox.append((conn, CloseRequest(code, reason)))

    def _callable(self, agent: Agent, name: Any) -> Any:
        if not isinstance(name, str) or name.startswith("_"):
            raise RpcError(f"no callable method {name!r} on agent {agent.agent_class}")
        method = getattr(agent, name, None)
        if method is None:
            raise RpcError(f"agent {agent.agent_class} has no method {name!r}")
        if callable_info(method) is None:
            raise RpcError(f"method {name!r} of agent {agent.agent_class} is not @callable")
        return method

    def _check_arguments(self, method: Any, name: str, args: Any, kwargs: Any) -> None:
        function = method.__func__
        signature = self._signatures.get(function)
        if signature is None:
            signature = self._signatures[function] = inspect.signature(method)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise RpcError(f"bad arguments for {name}{signature}: {err}") from None

    def _rpc(
        self,
        slot: _Slot,
        agent: Agent,
        conn: Connection,
        request: jsonproto.RpcRequest,
        turn: _Turn,
    ) -> Any:
        turn.rpc_id = request.id
        turn.rpc_conn = conn
        turn.readonly = conn.readonly
        method = self._callable(agent, request.method)
        info = callable_info(method)
        assert info is not None
        args: list[Any] = list(request.args)
        if info.streaming:
            rpc_id = request.id
            args.insert(
                0, RpcStream(lambda chunk: conn.send(jsonproto.encode_rpc_chunk(rpc_id, chunk)))
            )
        self._check_arguments(method, request.method, args, request.kwargs)
        result = method(*args, **request.kwargs)
        if result is not None and inspect.isawaitable(result):
            return self._finish_rpc(conn, request.id, result)
        conn.send(_encode_rpc_result(request.id, result))
        return None

    async def _finish_rpc(self, conn: Connection, rpc_id: str, pending: Any) -> None:
        conn.send(_encode_rpc_result(rpc_id, await pending))

    def _client_state_update(
        self, slot: _Slot, conn: Connection, new_state: Any, turn: _Turn
    ) -> None:
        if conn.readonly:
            conn.send(jsonproto.encode_state_error("connection is read-only"))
            return
        try:
            self._set_state(slot, new_state, conn)
        except StateRejectedError as err:
            conn.send(jsonproto.encode_state_error(str(err)))

    def _report_turn_error(
        self, slot: _Slot, event: _Event, turn: _Turn, err: BaseException
    ) -> None:
        what = _EVENT_NAMES[event.kind]
        message = f"{what} failed: {type(err).__name__}: {err}"
        if turn.rpc_id is not None and turn.rpc_conn is not None:
            # RPC replies always flow, even on protocol-disabled connections.
            turn.rpc_conn.send(jsonproto.encode_rpc_error(turn.rpc_id, message))
        elif event.conn is not None and event.conn.protocol_enabled and event.kind == _MESSAGE:
            event.conn.send(jsonproto.encode_error(message))
        remote = f" from {event.conn.transport} {event.conn.remote}" if event.conn else ""
        log = logger.warning if isinstance(err, AgentError | LinkRejected) else logger.error
        log(
            "agents: %s/%r: %s%s rolled back: %s: %s",
            slot.key[0],
            slot.key[1],
            what,
            remote,
            type(err).__name__,
            err,
            exc_info=not isinstance(err, AgentError | LinkRejected),
        )

    async def _on_error_turn(self, slot: _Slot, err: BaseException) -> None:
        """on_error runs inside the batch's transaction in its own savepoint (it may log to
        SQL); its own failures are logged, never recursive."""
        agent = slot.agent
        db = slot.db
        if agent is None or db is None or not _overrides(slot.cls, "on_error"):
            return
        turn = _Turn(None)
        slot.turn = turn
        db.savepoint()
        try:
            async with asyncio.timeout(self.settings.turn_timeout_s):
                await _maybe_await(agent.on_error(err))
            db.release()
        except Exception:
            db.rollback_to_savepoint()
            logger.exception("agents: %s/%r: on_error itself failed", *slot.key)
        finally:
            slot.turn = None

    async def _notify_error_outside_turn(self, agent: Agent, err: BaseException) -> None:
        try:
            async with asyncio.timeout(self.settings.turn_timeout_s):
                await _maybe_await(agent.on_error(err))
        except Exception:
            logger.exception("agents: %s/%r: on_error itself failed", agent.agent_class, agent.id)

    # -- state ------------------------------------------------------------------------------------

    def _db_for_turn(self, slot: _Slot) -> AgentDatabase:
        if slot.turn is None or slot.db is None:
            raise NotInTurnError(
                f"agent {slot.key[0]}/{slot.key[1]!r}: storage used outside a turn; call it from "
                "a hook, a @callable, a scheduled or queued method"
            )
        return slot.db

    def _set_state(self, slot: _Slot, new_state: Any, source: Connection | str) -> None:
        db = self._db_for_turn(slot)
        turn = slot.turn
        assert turn is not None and slot.agent is not None
        if turn.readonly:
            raise ReadonlyConnectionError(
                f"agent {slot.key[0]}/{slot.key[1]!r}: a read-only connection cannot change state"
            )
        if _overrides(slot.cls, "validate_state_change"):
            try:
                slot.agent.validate_state_change(new_state, source)
            except Exception as err:
                raise StateRejectedError(f"state change rejected: {err}") from err
        try:
            state_json = json.dumps(new_state, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise StateRejectedError(f"state must be JSON-serialisable: {err}") from err
        db.save_state(state_json)
        slot.state = new_state
        conns = self._conns_by_agent.get(slot.key)
        if conns:
            frame = '{"type":"gw.state","state":' + state_json + "}"
            for conn in conns.values():
                if conn.protocol_enabled and conn is not source:
                    conn.send(frame)
        if _overrides(slot.cls, "on_state_changed"):
            turn.notifications.append((new_state, source))

    async def _notify_state_changed(self, slot: _Slot, note: tuple[Any, Any]) -> None:
        agent = slot.agent
        assert agent is not None
        try:
            await _maybe_await(agent.on_state_changed(*note))
        except Exception:
            logger.exception("agents: %s/%r: on_state_changed failed (ignored)", *slot.key)

    # -- connections --------------------------------------------------------------------------

    def _connections_of(self, key: AgentKey) -> list[Connection]:
        conns = self._conns_by_agent.get(key)
        return [c for c in conns.values() if not c.closed] if conns else []

    def _unregister(self, conn: Connection) -> None:
        self._conns.pop(conn.id, None)
        route = conn.link.route
        key = (route.agent_class, route.agent_id)
        conns = self._conns_by_agent.get(key)
        if conns is not None:
            conns.pop(conn.id, None)
            if not conns:
                del self._conns_by_agent[key]

    # -- hibernation ----------------------------------------------------------------------------

    async def _hibernate_idle_forever(self) -> None:
        interval_s = min(1.0, self.settings.hibernate_after_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            self._evict_idle(self._now() - self.settings.hibernate_after_s)
            if self._evicted_since_trim >= _TRIM_AFTER_EVICTIONS and not self._closing:
                # After the closes finished: hand the freed SQLite memory back to the OS.
                self._evicted_since_trim = 0
                assert self._loop is not None
                await self._loop.run_in_executor(self._executor, release_free_memory)

    def _evict_idle(self, idle_since: float) -> int:
        evicted = 0
        for slot in list(self._slots.values()):
            if slot.task is not None or slot.mailbox or slot.agent is None:
                continue
            if slot.last_active > idle_since:
                break  # LRU order: everything after is more recent
            self._evict(slot)
            evicted += 1
        return evicted

    def _evict_lru(self) -> None:
        # The least recently used are at the front; look a little past the excess in case
        # some of them are busy, instead of copying the whole (large) dict.
        excess = self._awake - self.settings.max_active_agents
        for slot in list(itertools.islice(self._slots.values(), excess + 64)):
            if self._awake <= self.settings.max_active_agents:
                return
            if slot.task is None and not slot.mailbox and slot.agent is not None:
                self._evict(slot)

    def _evict(self, slot: _Slot, *, count: bool = True) -> None:
        """Drop the instance and close its database off the loop (a close checkpoints)."""
        db = slot.db
        slot.agent = None
        slot.db = None
        slot.state = None
        slot.stores = {}
        self._awake -= 1
        ACTIVE.set(self._awake)
        self._evicted_since_trim += 1
        if count:
            self._counters["hibernations_total"] += 1
            HIBERNATIONS.inc()
        if self._slots.get(slot.key) is slot and slot.task is None and not slot.mailbox:
            del self._slots[slot.key]
        if db is not None:
            self._close_db_later(slot.key, db)

    def _close_db_later(
        self, key: AgentKey, db: AgentDatabase, then: Callable[[], None] | None = None
    ) -> None:
        assert self._loop is not None

        def close() -> None:
            try:
                db.close()
            except Exception:
                logger.exception("agents: %s/%r: closing the database failed", *key)
            if then is not None:
                then()

        future = self._loop.run_in_executor(self._executor, close)
        self._closing[key] = future

        def forget(done: asyncio.Future[None]) -> None:
            if self._closing.get(key) is done:
                del self._closing[key]

        future.add_done_callback(forget)

    # -- destroy ------------------------------------------------------------------------------

    def _request_destroy(self, slot: _Slot) -> None:
        if slot.turn is None:
            raise NotInTurnError("destroy() must be called from within a turn")
        slot.turn.destroy = True

    async def _destroy(self, slot: _Slot) -> None:
        key = slot.key
        slot.destroy_requested = False
        for conn in self._connections_of(key):
            deliver(conn, CloseRequest(1000, "agent destroyed"))
            self._unregister(conn)
        db = slot.db
        path = db.path if db is not None else None
        if slot.agent is not None:
            self._evict(slot, count=False)
        if self._slots.get(key) is slot:
            del self._slots[key]
        closing = self._closing.get(key)
        if closing is not None:
            await asyncio.shield(closing)
        if path is not None:
            AgentDatabase.delete_files(path)
        self._on_destroyed(key)
        logger.info("agents: %s/%r destroyed (storage deleted)", *key)
        if slot.mailbox:  # events that arrived meanwhile go to a fresh agent
            for event in slot.mailbox:
                self._enqueue(key, event)
            slot.mailbox.clear()

    async def _infer(self, model: str, inputs: Any, **kwargs: Any) -> Any:
        if self.engine is None:
            raise NoEngineError(
                f"infer({model!r}): this gateway has no inference engine configured"
            )
        return await self.engine.infer(model, inputs, **kwargs)


def _encode_rpc_result(rpc_id: str, result: Any) -> str:
    try:
        return jsonproto.encode_rpc_result(rpc_id, result)
    except (TypeError, ValueError) as err:
        raise RpcError(f"result of RPC {rpc_id!r} is not JSON-serialisable: {err}") from err


async def _maybe_await(value: Any) -> Any:
    if value is not None and inspect.isawaitable(value):
        return await value
    return value


def _fail(future: asyncio.Future[Any] | None, err: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(err)
