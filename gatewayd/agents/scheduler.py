"""`SlotScheduler`: which agents are in memory and when each one runs.

It owns the slots (one per agent identity that is awake or has events queued), each slot's
FIFO mailbox and the task that drains it batch after batch (what one batch does is
batch.py's job, handed in as `run_batch`), the mailbox bound (`max_mailbox_events`: callers
check `mailbox_full` and wait on `when_room`), hibernation of idle agents, LRU eviction beyond
`max_active_agents`, and `destroy()`'s teardown (inside the slot's task, so FIFO holds). Different agents run concurrently on the one
event loop; one agent never runs two batches at once.

Parking: an agent that hibernates when idle (not one evicted beyond `max_active_agents`)
gets its database prepared exactly as for a close (outputs settled, WAL checkpointed and
restarted, see storage.py) but the connection stays open, in a small LRU of the
`PARKED_DATABASES` most recently hibernated agents, for at most `hibernate_after_s`; beyond
either bound they close. A wake takes its parked connection back (`take_parked`) instead of
opening the file, unless the files changed since (then it closes it and opens the file
afresh). Nothing durable changes: a parked database is in the state a closed one would be in,
with its files on disk.

Imports no other runtime module but `slot`, `registry` and `metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gatewayd.agents.agent import Agent
from gatewayd.agents.connection import CloseRequest, Connection, deliver
from gatewayd.agents.errors import AgentError
from gatewayd.agents.memory import release_free_memory
from gatewayd.agents.metrics import ACTIVE, HIBERNATIONS, WAKES
from gatewayd.agents.outbox import Outbox
from gatewayd.agents.registry import ConnectionRegistry
from gatewayd.agents.settings import AgentSettings
from gatewayd.agents.slot import FN, AgentKey, Event, Slot, fail
from gatewayd.agents.storage import AgentDatabase, ParkedFiles
from protocols.link import LinkRejected

logger = logging.getLogger(__name__)

# Return freed memory to the OS once this many agents were evicted (see memory.py).
_TRIM_AFTER_EVICTIONS = 100
# Hibernated agents whose database connection stays open for a quick wake (3 file
# descriptors and ~90 KiB of memory each; the page cache is released when parking).
PARKED_DATABASES = 32


class SlotScheduler:
    """Slots, mailboxes, the per-agent run loop, hibernation and eviction."""

    def __init__(
        self,
        settings: AgentSettings,
        classes: Mapping[str, type[Agent]],
        registry: ConnectionRegistry,
        counters: dict[str, int],
        *,
        run_batch: Callable[[Slot], Awaitable[None]],
        on_destroyed: Callable[[AgentKey], None],
        outputs: Outbox,
    ) -> None:
        self.settings = settings
        self.classes = classes
        self.registry = registry
        self.counters = counters
        self._run_batch = run_batch
        self._on_destroyed = on_destroyed
        self._outputs = outputs
        self.slots: OrderedDict[AgentKey, Slot] = OrderedDict()
        # Databases being closed off the loop, by agent: a wake waits for its close first.
        self.closing: dict[AgentKey, asyncio.Future[Any]] = {}
        # Hibernated agents' databases still open, least recently parked first (see above).
        # Values: (database, its files when parked, loop time when parked).
        self.parked: OrderedDict[AgentKey, tuple[AgentDatabase, ParkedFiles, float]] = OrderedDict()
        self.awake = 0
        self._last_hibernated_at = 0.0
        # Agents whose run loop (`_run`) is running now.
        self.running = 0
        self._shutting_down = False
        self._evicted_since_trim = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        self._loop = loop
        self._executor = executor

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- what is running ---------------------------------------------------------------------

    def busy_tasks(self) -> list[asyncio.Task[None]]:
        return [slot.task for slot in self.slots.values() if slot.task is not None]

    def events_queued(self) -> int:
        return sum(len(slot.mailbox) for slot in self.slots.values())

    def is_awake(self, key: AgentKey) -> bool:
        slot = self.slots.get(key)
        return slot is not None and slot.agent is not None

    # -- the mailbox bound -----------------------------------------------------------------------

    def mailbox_full(self, key: AgentKey) -> bool:
        slot = self.slots.get(key)
        return slot is not None and len(slot.mailbox) >= self.settings.max_mailbox_events

    def when_room(self, key: AgentKey) -> asyncio.Future[None]:
        """A future resolved (never failed) once the agent's full mailbox has room again, or
        when the runtime stops accepting events."""
        slot = self.slots[key]
        if slot.room is None or slot.room.done():
            assert self._loop is not None
            slot.room = self._loop.create_future()
            logger.warning(
                "agents: %s/%r: mailbox full (%d events waiting, agents.max_mailbox_events=%d); "
                "its transports hold new input until it drains. If this persists the agent is "
                "too slow for its input rate (see turn times) or the limit is too low",
                slot.key[0],
                slot.key[1],
                len(slot.mailbox),
                self.settings.max_mailbox_events,
            )
        return slot.room

    def _open_room(self, slot: Slot) -> None:
        room = slot.room
        if room is not None and len(slot.mailbox) < self.settings.max_mailbox_events:
            slot.room = None
            if not room.done():
                room.set_result(None)

    def open_every_room(self) -> None:
        """Resolve every pending `when_room` future (the runtime is shutting down)."""
        for slot in self.slots.values():
            room, slot.room = slot.room, None
            if room is not None and not room.done():
                room.set_result(None)

    # -- the mailbox and the run loop ----------------------------------------------------------

    def _send_in_a_turn(self, key: AgentKey, conn: Connection, data: bytes | str) -> None:
        """An output for a device sent outside any turn (e.g. from a task the agent started)
        is sent from a turn of its own: outbox rows are only written inside transactions."""
        if self._shutting_down:
            logger.warning(
                "agents: %s/%r: output to %s %s sent outside a turn during shutdown; dropped",
                key[0],
                key[1],
                conn.transport,
                conn.remote,
            )
            return
        self.enqueue(key, Event(FN, None, None, lambda _agent: conn.send(data)))

    def enqueue(self, key: AgentKey, event: Event) -> Slot:
        """Append `event` to the agent's mailbox and make sure its run loop is running."""
        slot = self.slots.get(key)
        if slot is None:
            slot = Slot(key, self.classes[key[0]])
            slot.defer_output = functools.partial(self._send_in_a_turn, key)
            self.slots[key] = slot
        slot.mailbox.append(event)
        if slot.task is None:
            assert self._loop is not None
            slot.task = self._loop.create_task(self._run(slot))
        return slot

    async def _run(self, slot: Slot) -> None:
        self.running += 1
        try:
            while slot.mailbox:
                await self._run_batch(slot)
                self._open_room(slot)
                if slot.destroy_requested:
                    # Still this slot's task: events that arrive meanwhile queue behind the
                    # ones already waiting, in order, and go to a fresh agent afterwards.
                    await self._destroy(slot)
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
                fail(event.future, AgentError("internal error in the agent runtime"))
            slot.mailbox.clear()
            if slot.agent is not None:
                self.evict(slot)
        finally:
            self.running -= 1
            slot.task = None
            slot.last_active = self.now()
            self._open_room(slot)
        if slot.mailbox:  # events arrived while tearing down
            slot.task = asyncio.get_running_loop().create_task(self._run(slot))
            return
        if self.slots.get(slot.key) is slot:
            if slot.agent is None:
                del self.slots[slot.key]  # nothing in memory: forget it
            else:
                self.slots.move_to_end(slot.key)
                if self.awake > self.settings.max_active_agents:
                    self.evict_lru()

    # -- waking and hibernating ----------------------------------------------------------------

    async def wait_for_close(self, key: AgentKey) -> None:
        """Wait until an earlier close of the agent's database (after eviction) finished."""
        closing = self.closing.get(key)
        if closing is not None:
            await asyncio.shield(closing)

    def mark_awake(self) -> None:
        self.awake += 1
        ACTIVE.set(self.awake)
        self.counters["wakes_total"] += 1
        WAKES.inc()

    async def hibernate_idle_forever(self) -> None:
        interval_s = min(1.0, self.settings.hibernate_after_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            self.evict_idle(self.now() - self.settings.hibernate_after_s)
            # Parked no longer than an agent idles before hibernating: a quiet gateway
            # ends up holding no hibernated agent's database open.
            self.close_parked_before(self.now() - self.settings.hibernate_after_s)
            if self._evicted_since_trim >= _TRIM_AFTER_EVICTIONS and not self.closing:
                # After the closes finished: hand the freed SQLite memory back to the OS.
                self._evicted_since_trim = 0
                assert self._loop is not None
                await self._loop.run_in_executor(self._executor, release_free_memory)

    def evict_idle(self, idle_since: float) -> int:
        evicted = 0
        for slot in list(self.slots.values()):
            if slot.task is not None or slot.mailbox or slot.agent is None:
                continue
            if slot.last_active > idle_since:
                break  # LRU order: everything after is more recent
            self.evict(slot, park=True)
            evicted += 1
        return evicted

    def evict_lru(self) -> None:
        # The least recently used are at the front; look a little past the excess in case
        # some of them are busy, instead of copying the whole (large) dict.
        excess = self.awake - self.settings.max_active_agents
        for slot in list(itertools.islice(self.slots.values(), excess + 64)):
            if self.awake <= self.settings.max_active_agents:
                return
            if slot.task is None and not slot.mailbox and slot.agent is not None:
                # Not parked: the least recently used of more agents than max_active_agents
                # are the least likely to wake soon.
                self.evict(slot)

    def evict(self, slot: Slot, *, count: bool = True, park: bool = False) -> None:
        """Drop the instance and close its database off the loop (a close checkpoints); with
        `park`, keep the connection open for a quick wake (see the module docstring)."""
        db = slot.db
        slot.agent = None
        slot.db = None
        slot.state = None
        slot.stores = {}
        self.awake -= 1
        ACTIVE.set(self.awake)
        self._evicted_since_trim += 1
        if count:
            self.counters["hibernations_total"] += 1
            HIBERNATIONS.inc()
        if self.slots.get(slot.key) is slot and slot.task is None and not slot.mailbox:
            del self.slots[slot.key]
        if db is not None:
            self._close_db_later(slot.key, db, park=park and not self._shutting_down)

    def take_parked(self, key: AgentKey) -> AgentDatabase | None:
        """Loop, at a wake: the agent's parked database with a transaction open, or None
        (none parked, or its files changed since: then it closes, see `wait_for_close`)."""
        entry = self.parked.pop(key, None)
        if entry is None:
            return None
        db, files, _parked_at = entry
        if db.resume(files):
            self.counters["parked_wakes_total"] = self.counters.get("parked_wakes_total", 0) + 1
            return db
        self._close_parked_later(key, db)
        return None

    def _park(
        self, key: AgentKey, db: AgentDatabase, files: ParkedFiles, hibernated_at: float
    ) -> None:
        if self._shutting_down:
            self._close_parked_later(key, db)
            return
        newest = next(reversed(self.parked.values()), None)
        self.parked[key] = (db, files, hibernated_at)
        if newest is not None and newest[2] > hibernated_at:
            # The closes finished out of order (several executor threads): keep the pool in
            # the order the agents hibernated, so the least recently used close first.
            self.parked = OrderedDict(sorted(self.parked.items(), key=lambda item: item[1][2]))
        while len(self.parked) > PARKED_DATABASES:
            oldest, (oldest_db, _files, _at) = self.parked.popitem(last=False)
            self._close_parked_later(oldest, oldest_db)

    def close_parked_before(self, parked_before: float) -> None:
        """Close the databases parked before that loop time (oldest first)."""
        while self.parked:
            key, (db, _files, parked_at) = next(iter(self.parked.items()))
            if parked_at >= parked_before:
                return
            del self.parked[key]
            self._close_parked_later(key, db)

    def _close_parked_later(self, key: AgentKey, db: AgentDatabase) -> None:
        assert self._loop is not None

        def close() -> None:
            try:
                db.close_parked()
            except Exception:
                logger.exception("agents: %s/%r: closing the database failed", *key)

        future = self._loop.run_in_executor(self._executor, close)
        self.closing[key] = future

        def forget(done: asyncio.Future[None]) -> None:
            if self.closing.get(key) is done:
                del self.closing[key]

        future.add_done_callback(forget)

    def _close_db_later(self, key: AgentKey, db: AgentDatabase, *, park: bool = False) -> None:
        assert self._loop is not None
        outputs = self._outputs
        # Delivered outputs' rows go before the file closes (outbox.py).
        settlement = outputs.settlement(key)
        # When the agent hibernated (strictly increasing: orders the parked pool).
        hibernated_at = self._last_hibernated_at = max(self.now(), self._last_hibernated_at + 1e-9)

        def close() -> ParkedFiles | None:
            if settlement is not None:
                try:
                    outputs.settle(settlement, db.connection)
                except Exception as err:
                    settlement.seqs = []
                    logger.warning(
                        "agents: %s/%r: deleting delivered outputs failed (%s); they are sent "
                        "again after a restart",
                        *key,
                        err,
                    )
            try:
                if park:
                    files = db.park()
                    if files is not None:
                        return files
                db.close()
            except Exception:
                logger.exception("agents: %s/%r: closing the database failed", *key)
                with contextlib.suppress(Exception):
                    db.close_parked()
            return None

        future = self._loop.run_in_executor(self._executor, close)
        self.closing[key] = future

        def forget(done: asyncio.Future[ParkedFiles | None]) -> None:
            if self.closing.get(key) is done:
                del self.closing[key]
            if settlement is not None:
                outputs.settled(settlement)
            files = None if done.cancelled() or done.exception() else done.result()
            if files is not None:
                # Before a wake waiting on this close resumes (its callback runs after).
                self._park(key, db, files, hibernated_at)

        future.add_done_callback(forget)

    # -- destroy ---------------------------------------------------------------------------------

    async def _destroy(self, slot: Slot) -> None:
        """Close the agent's connections and delete its storage, from the slot's own task (so
        the slot stays registered and busy: nothing else wakes the agent meanwhile)."""
        key = slot.key
        slot.destroy_requested = False
        for conn in self.registry.open_of(key):
            deliver(conn, CloseRequest(1000, "agent destroyed"))
            self.registry.unregister(conn)
        db = slot.db
        path = db.path if db is not None else None
        if slot.agent is not None:
            self.evict(slot, count=False)
        parked = self.parked.pop(key, None)
        if parked is not None:
            self._close_parked_later(key, parked[0])
        await self.wait_for_close(key)
        if path is not None:
            AgentDatabase.delete_files(path)
        self._outputs.forget(key)
        self._on_destroyed(key)
        logger.info("agents: %s/%r destroyed (storage deleted)", *key)

    # -- shutdown --------------------------------------------------------------------------------

    async def shut_down(self) -> None:
        """Cancel every agent's run loop, fail what is still queued, close every database
        (each agent's teardown on its own: one that fails does not keep the others open)."""
        self._shutting_down = True
        self.open_every_room()
        for slot in list(self.slots.values()):
            try:
                if slot.task is not None:
                    slot.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await slot.task
                for event in slot.mailbox:
                    fail(event.future, LinkRejected("shutting down", code=1001))
                slot.mailbox.clear()
                if slot.agent is not None:
                    self.evict(slot)
            except Exception:
                logger.exception("agents: %s/%r: shutting the agent down failed", *slot.key)
        self.close_parked_before(float("inf"))
        while self.closing:
            # Parks finishing meanwhile close at once (`_park`), adding to `closing`.
            await asyncio.gather(*list(self.closing.values()), return_exceptions=True)
