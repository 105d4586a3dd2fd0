"""`BatchRunner`: one batch of an agent's turns, one transaction, behind the output gate.

A batch is one SQLite transaction: consecutive events of the agent's mailbox (up to
`max_turns_per_commit`) each run as a turn (turn.py) in its own SAVEPOINT. Every output of
every turn (sends, broadcasts, RPC replies, closes) is buffered in the slot's outbox and,
with the transport's futures, released only after the batch's COMMIT (`commit_batch`, the one
commit path). No fsync runs on the event loop: with durability="full" the COMMIT runs on the
shared executor grouped with other agents' commits (committer.py); with "normal" it does not
fsync and runs inline, and the WAL checkpoint (which does) runs on that executor afterwards.
If the transaction is lost, nothing of the batch leaves and the agent is reloaded from disk.

Two storage failures are not retried agent by agent: a full disk (diskspace.py: one log line,
Backpressure to every transport until space returns) and a corrupt database file
(quarantine.py: that agent's events are refused at once, every other agent keeps serving).

A streaming RPC chunk is a *commit point* inside a turn (`commit_point`): the batch's writes so
far commit, the outputs so far (the chunk last) are released and the finished events settled,
then a new transaction and savepoint continue the turn. COMMIT therefore happens in two places,
`commit_batch` and the commit point, both through `_commit_inline`/the group committer and
both releasing through `BatchRunner._release`.

A batch wakes a hibernated agent first (opens its database, runs `on_start` as a turn).
Imports no other runtime module but `slot`, `registry`, `scheduler`, `turn`, `metrics`,
`outbox` (device outputs written in the batch leave as outbox rows, tracked to delivery),
`diskspace` and `quarantine`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from gatewayd.agents.agent import Agent, AgentHost
from gatewayd.agents.committer import GroupCommitter
from gatewayd.agents.connection import Connection, deliver
from gatewayd.agents.diskspace import DiskSpaceGuard
from gatewayd.agents.errors import CommitError
from gatewayd.agents.metrics import HOT
from gatewayd.agents.outbox import Outbox, OutboxRow
from gatewayd.agents.quarantine import Quarantine, corruption_of
from gatewayd.agents.registry import ConnectionRegistry
from gatewayd.agents.scheduler import SlotScheduler
from gatewayd.agents.settings import AgentSettings
from gatewayd.agents.slot import (
    ALARM,
    CONNECT,
    START,
    Done,
    Event,
    Output,
    Slot,
    TransactionLost,
    Turn,
    fail,
)
from gatewayd.agents.storage import AgentDatabase, agent_db_file
from gatewayd.agents.turn import TurnRunner

logger = logging.getLogger(__name__)


class Replicator(Protocol):
    """Cluster mode's view of every batch: `before_commit` runs after the batch's turns and
    before its COMMIT (the transaction still open on `connection`); raising aborts the batch
    (nothing of it commits, leaves or is acknowledged)."""

    async def before_commit(self, key: tuple[str, str], connection: sqlite3.Connection) -> None: ...


class BatchRunner:
    """Wakes agents and runs their batches (see the module docstring)."""

    def __init__(
        self,
        settings: AgentSettings,
        scheduler: SlotScheduler,
        registry: ConnectionRegistry,
        turns: TurnRunner,
        counters: dict[str, int],
        *,
        make_host: Callable[[Slot], AgentHost],
        run_alarm: Callable[[Slot, list[Done], list[tuple[Connection, Any]]], Any],
        after_wake: Callable[[Slot], None],
        after_commit: Callable[[Slot], None],
        wake_failed: Callable[[Slot], None],
        outputs: Outbox,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.registry = registry
        self.turns = turns
        self.counters = counters
        self._make_host = make_host
        self._run_alarm = run_alarm
        self._after_wake = after_wake
        self._after_commit = after_commit
        self._wake_failed = wake_failed
        self._outputs = outputs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._committer: GroupCommitter | None = None
        self.disk = DiskSpaceGuard(os.fspath(settings.state_dir))
        self.quarantine = Quarantine()
        # Cluster mode (gatewayd/cluster): sees each batch's writes before its COMMIT and may
        # refuse them (raise), e.g. when this member no longer owns the agent.
        self.replicator: Replicator | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: ThreadPoolExecutor,
        committer: GroupCommitter,
    ) -> None:
        self._loop = loop
        self._executor = executor
        self._committer = committer
        self.disk.start(loop, executor)

    # -- one batch ------------------------------------------------------------------------------

    async def run_batch(self, slot: Slot) -> None:
        outbox: list[Output] = []
        done: list[Done] = []
        undo_conns: list[tuple[Connection, Any]] = []
        slot.outbox = outbox
        slot.done = done
        slot.undo_conns = undo_conns
        try:
            if slot.agent is None and not await self._wake(slot, done, undo_conns):
                return
            db = slot.db
            assert db is not None
            db.begin()
            self._outputs.begin_batch(slot.key, slot.stores, db.connection)
            mailbox = slot.mailbox
            budget = self.settings.max_turns_per_commit
            try:
                while mailbox and budget > 0:
                    budget -= 1
                    event = mailbox.popleft()
                    if event.kind == ALARM:
                        await self._run_alarm(slot, done, undo_conns)
                        continue
                    err = await self.turns.run(slot, event, done, undo_conns)
                    if err is not None and await self._storage_failed(err):
                        # A full disk or a damaged file: the other turns of this batch would
                        # meet it too; give up the batch (see _abort_batch).
                        raise TransactionLost(
                            f"storage failed in a turn ({type(err).__name__}: {err})"
                        ) from err
                    if slot.destroy_requested:
                        break
            except TransactionLost as lost:
                await self._abort_batch(
                    slot, str(lost), done, outbox, undo_conns, cause=lost.__cause__
                )
                return
            except Exception as err:
                logger.exception("agents: %s/%r: internal error in a turn", *slot.key)
                await self._abort_batch(
                    slot, f"internal error ({type(err).__name__}: {err})", done, outbox, undo_conns,
                    cause=err,
                )  # fmt: skip
                return
            await self.commit_batch(slot, db, outbox, done, undo_conns)
        finally:
            slot.outbox = None
            slot.done = None
            slot.undo_conns = None

    async def commit_batch(
        self,
        slot: Slot,
        db: AgentDatabase,
        outbox: list[Output],
        done: list[Done],
        undo_conns: list[tuple[Connection, Any]],
    ) -> None:
        """The commit path: COMMIT the batch, then open the output gate (release `outbox` to
        the transports, settle the events' futures), then checkpoint if the WAL is due."""
        assert self._loop is not None
        assert self._committer is not None
        try:
            # The batch's dedup seqs, once per stream, and its state, once; rows of outputs
            # delivered meanwhile (not at the transaction's start: then its first turn needs
            # no SAVEPOINT).
            db.write_seqs()
            db.write_state()
            self._outputs.delete_delivered(slot.key, slot.stores, db.connection)
            if self._outputs.needs_mark(slot.key):
                # The outbox index must list the agent before its rows are durable, or a crash
                # right after this commit would hide them from the next start (outbox.py).
                await self._loop.run_in_executor(self._executor, self._outputs.mark, slot.key)
            if self.replicator is not None:
                await self.replicator.before_commit(slot.key, db.connection)
            if db.commit_fsyncs:
                await self._committer.commit(db)
            else:
                _commit_inline(db)
        except Exception as err:
            self.counters["commit_errors"] += 1
            HOT.commit_errors += 1
            await self._abort_batch(
                slot, f"commit failed ({type(err).__name__}: {err})", done, outbox, undo_conns,
                cause=err,
            )  # fmt: skip
            return
        self.counters["commits_total"] += 1
        HOT.commits += 1
        self._release(slot, outbox, done)
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

    def _release(self, slot: Slot, outbox: list[Output], done: list[Done]) -> None:
        """Open the output gate for committed work: outputs to the transports, then the
        events' futures (acknowledgements, call results). The one place committed outputs
        leave, at the end of a batch and at a commit point. Outputs for devices are outbox
        rows: they go to their transport tracked (outbox.py), even if their link closed."""
        rows: list[OutboxRow] = []
        for conn, data in outbox:
            if isinstance(data, OutboxRow):
                rows.append(data)
                continue
            try:
                deliver(conn, data)
            except Exception:
                logger.exception("agents: transport failed to take output for %r", conn)
        self._outputs.committed(slot.key, rows)
        for future, result, is_error in done:
            if future is None or future.done():
                continue
            if is_error:
                future.set_exception(result)
            else:
                future.set_result(result)

    # -- commit points (streaming RPC chunks) ---------------------------------------------------

    def commit_point(self, slot: Slot, turn: Turn) -> Awaitable[None]:
        """A chunk of a streaming RPC of `turn` was just put in the outbox: commit what the
        batch wrote so far and release every output up to it. Inline with
        durability="normal" (that COMMIT does not fsync); with "full", when the returned
        awaitable is awaited (the COMMIT runs off the loop)."""
        db = slot.db
        if db is None or not self._at_commit_point(slot, turn):
            return _RELEASED  # the turn is over: the chunk went out or goes out with its batch
        self._write_outputs_so_far(slot, turn, db)
        if db.commit_fsyncs or self._outputs.needs_mark(slot.key):
            # (The outbox index is written off the loop before such a commit: see commit_batch.)
            return _OnAwait(lambda: self._commit_point_off_loop(slot, turn))
        db.end_turn(turn.savepoint)
        try:
            _commit_inline(db)
        except Exception as err:
            raise self._commit_point_failed(slot, turn, db, err) from err
        self._commit_point_done(slot, turn, db)
        return _RELEASED

    def _write_outputs_so_far(self, slot: Slot, turn: Turn, db: AgentDatabase) -> None:
        """At a commit point: the turn's outputs for devices so far become outbox rows of the
        transaction about to commit (at the end of a turn, turn.py does the same)."""
        assert slot.outbox is not None
        self._outputs.write_turn_outputs(
            slot.key, slot.stores, db.connection, slot.outbox, turn.outbox_mark
        )  # (entries already written are OutboxRows and are skipped)

    def _at_commit_point(self, slot: Slot, turn: Turn) -> bool:
        return slot.turn is turn and slot.outbox is not None and turn.lost is None

    async def _commit_point_off_loop(self, slot: Slot, turn: Turn) -> None:
        while turn.committing is not None:  # a task of this turn awaits another chunk's commit
            await asyncio.wait([turn.committing])
        db = slot.db
        if db is None or not self._at_commit_point(slot, turn):
            return
        assert self._committer is not None and self._loop is not None
        # Set until this commit point is complete (new transaction open, outputs released):
        # the turn waits for it before it ends, and storage is refused meanwhile (turn.py).
        point = turn.committing = self._loop.create_future()
        try:
            self._write_outputs_so_far(slot, turn, db)  # what the turn sent while waiting
            if self._outputs.needs_mark(slot.key):
                await self._loop.run_in_executor(self._executor, self._outputs.mark, slot.key)
            db.end_turn(turn.savepoint)
            commit = self._committer.commit(db)
            cancelled = False
            while not commit.done():
                try:
                    await asyncio.shield(commit)
                except asyncio.CancelledError:
                    # The turn timed out (or shutdown) while its writes were committing:
                    # finish this commit point first, so only what follows is rolled back.
                    cancelled = True
                except Exception:
                    break
            err = commit.exception()
            if err is not None:
                raise self._commit_point_failed(slot, turn, db, err) from err
            self._commit_point_done(slot, turn, db)
        finally:
            turn.committing = None
            point.set_result(None)
        if cancelled:
            raise asyncio.CancelledError

    def _commit_point_done(self, slot: Slot, turn: Turn, db: AgentDatabase) -> None:
        assert slot.outbox is not None and slot.done is not None and slot.undo_conns is not None
        self.counters["commits_total"] += 1
        HOT.commits += 1
        outbox, done = list(slot.outbox), list(slot.done)
        slot.outbox.clear()
        slot.done.clear()
        slot.undo_conns.clear()
        turn.conn_undo.clear()
        turn.outbox_mark = 0
        turn.state_before = slot.state
        self._after_commit(slot)
        db.begin()
        db.savepoint()
        turn.savepoint = True
        self._release(slot, outbox, done)

    def _commit_point_failed(
        self, slot: Slot, turn: Turn, db: AgentDatabase, err: BaseException
    ) -> TransactionLost:
        """The batch's transaction is lost: the turn fails when it ends, whatever it does with
        the error; until then it writes into a transaction that is never committed."""
        self.counters["commit_errors"] += 1
        HOT.commit_errors += 1
        turn.lost = TransactionLost(
            f"commit failed at a streaming RPC chunk ({type(err).__name__}: {err})"
        )
        db.rollback()
        db.begin()
        db.savepoint()
        turn.savepoint = True
        return turn.lost

    async def _abort_batch(
        self,
        slot: Slot,
        why: str,
        done: list[Done],
        outbox: list[Output],
        undo_conns: list[tuple[Connection, Any]],
        *,
        cause: BaseException | None = None,
    ) -> None:
        """The batch's transaction is lost: nothing of it may leave or be acknowledged.

        On a full disk every event fails with the guard's `Backpressure` (the transports hold
        and resubmit once space is back); on a corrupt file with the quarantine's refusal;
        otherwise with its own error or a `CommitError`."""
        error: BaseException = CommitError(
            f"agent {slot.key[0]}/{slot.key[1]!r}: {why}; {len(outbox)} outputs dropped, "
            f"{len(done)} events not acknowledged, agent reloaded from disk"
        )
        self._outputs.aborted(slot.key)
        refusal: BaseException | None = None
        if cause is not None and await self.disk.check(cause):
            refusal = self.disk.refusal()
            # The guard logged the one line an operator needs; this is one of many batches.
            logger.info("agents: %s", error)
        else:
            corrupt = corruption_of(cause)
            if corrupt is not None and slot.db is not None:
                refusal = self.quarantine.add(slot.key, slot.db.path, corrupt)
            logger.error("agents: %s", error)
        if refusal is not None:
            error = refusal
        for conn, old_state in reversed(undo_conns):
            conn._state = old_state
        for future, result, is_error in done:
            fail(future, refusal or (result if is_error else error))
        self._drop_failed_connects(done)
        slot.destroy_requested = False  # a destroy() whose turn did not commit did not happen
        agent = slot.agent
        if agent is not None:
            self.scheduler.evict(slot, count=False)
            await self.turns.notify_error_outside_turn(slot, agent, error)

    def _drop_failed_connects(self, done: list[Done]) -> None:
        """Connections whose connect turn did not commit are not open: close them."""
        for future, _result, _is_error in done:
            conn = getattr(future, "_gw_connecting", None)
            if conn is not None:
                self.registry.unregister(conn)
                if not conn.closed:
                    conn.closed = True
                    conn.link.close(1011, "agent could not accept the connection")

    # -- waking ---------------------------------------------------------------------------------

    async def _storage_failed(self, err: BaseException) -> bool:
        """Whether a turn's error was the disk filling up or the file being damaged."""
        return corruption_of(err) is not None or await self.disk.check(err)

    def _refuse_all(self, slot: Slot, refusal: BaseException) -> bool:
        """The agent cannot wake: fail every queued event. A connection whose connect event is
        among them is not open (the transport may open the same link id again later)."""
        self._wake_failed(slot)
        for event in slot.mailbox:
            if event.kind == CONNECT and event.conn is not None:
                self.registry.unregister(event.conn)
                event.conn.closed = True
            fail(event.future, refusal)
        slot.mailbox.clear()
        return False

    async def _wake(
        self, slot: Slot, done: list[Done], undo_conns: list[tuple[Connection, Any]]
    ) -> bool:
        await self.scheduler.wait_for_close(slot.key)
        settings = self.settings
        # Neither a full disk nor a quarantined file is worth opening the database for.
        refused = self.disk.refusal() or self.quarantine.refusal(slot.key)
        if refused is not None:
            return self._refuse_all(slot, refused)
        try:
            # A recently hibernated agent's connection may still be open (scheduler.py:
            # parking); else opening touches the file system (creating -wal/-shm files, a new
            # database's header): off the loop, on the shared executor.
            assert self._loop is not None
            db = self.scheduler.take_parked(slot.key)
            if db is None:
                await self.scheduler.wait_for_close(slot.key)  # a parked one found changed
                if self.scheduler.running <= 1:
                    # Nothing else to run meanwhile: a file whose pages are in the page cache
                    # and whose kept WAL is started opens here, without the two thread
                    # hand-offs (no fsync, no disk wait: storage.py). With other agents
                    # busy, the executor opens it while the loop serves them.
                    db = AgentDatabase.open_if_warm(
                        settings.state_dir,
                        slot.key[0],
                        slot.key[1],
                        durability=settings.durability,
                        max_db_bytes=settings.max_db_bytes,
                        max_value_bytes=settings.max_value_bytes,
                    )
                    if db is not None:
                        self.counters["warm_opens_total"] = (
                            self.counters.get("warm_opens_total", 0) + 1
                        )
            if db is None:
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
            refusal: BaseException | None = None
            if await self.disk.check(err):
                refusal = self.disk.refusal()
            else:
                corrupt = corruption_of(err)
                if corrupt is not None:
                    path = agent_db_file(os.fspath(settings.state_dir), *slot.key)
                    refusal = self.quarantine.add(slot.key, path, corrupt)
                else:
                    logger.error("agents: cannot wake %s/%r: %s", slot.key[0], slot.key[1], err)
            return self._refuse_all(slot, refusal or err)
        db.begin()
        found, state = db.load_state()
        if not found:
            state = copy.deepcopy(slot.cls.initial_state)
        agent: Agent = slot.cls.__new__(slot.cls)
        agent._gw_host = self._make_host(slot)
        slot.agent = agent
        slot.db = db
        slot.state = state
        slot.stores = {}
        self.scheduler.mark_awake()
        for conn in self.registry.registered(slot.key):
            conn._gate = slot
        if slot.cls.__init__ is not object.__init__:
            slot.cls.__init__(agent)
        await self.turns.run(slot, Event(START, None), done, undo_conns)
        self._after_wake(slot)
        if self.scheduler.awake > settings.max_active_agents:
            self.scheduler.evict_lru()
        return True


def _commit_inline(db: AgentDatabase) -> None:
    # durability="normal": this COMMIT never fsyncs (storage.py), so it runs inline; a thread
    # hand-off would cost more than the commit itself.
    assert not db.commit_fsyncs
    db.commit()


class _Released:
    """An awaitable that is already complete (the chunk is out)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


_RELEASED = _Released()


class _OnAwait:
    """Runs `start()` only when awaited: a chunk nobody awaits costs nothing (and warns not)."""

    __slots__ = ("_start",)

    def __init__(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._start = start

    def __await__(self) -> Generator[Any, None, None]:
        return self._start().__await__()
