"""Durable outputs: what an agent sends to a device is kept on disk until the device has it.

A message for a device (an MQTT reply or command, a TCP PUSH) is a row of `_gw_outbox` in the
agent's own SQLite, written in the SAME transaction as the turn that sent it: if the turn
rolls back, the output never existed; once it commits, the output survives a crash. After the
commit the runtime hands the row to its transport (`protocols.link.DurableOutputs`), which
calls back when the device side has it (MQTT: PUBACK, or handed to the socket for QoS 0; TCP:
the device's ACK). The row is then deleted, in the agent's next transaction (deletes are
batched; a crash before that only resends an already delivered output: at least once).

Rows carry their full address (transport, topic or device id, QoS), so they can be sent again
after a restart without a live session: MQTT rows are republished at once, TCP rows wait in
the listener until the device reconnects. The row id (`seq`: never reused, even after deletes,
see outbox_schema.py) orders one agent's outputs and is the TCP push seq (FRAMES.md section 6).

Finding the agents with undelivered rows at start-up must not open every agent database:
`OutboxIndex` is a small gateway-wide SQLite file listing them. An agent is marked there
(durably, off the loop) before the first commit that leaves it with undelivered rows and
unmarked only when it hibernates with none left. A stale mark costs one needless wake.

Backpressure and bounds: `Outbox.append` refuses (OutboxFullError, the turn rolls back) once an
agent holds `max_undelivered` undelivered outputs, so an unreachable device cannot grow memory
or disk without bound. The MQTT bridge also stops reading device messages while its outbound
backlog is over its limit; the TCP listener writes at most a push window per device and keeps
the rest (both in protocols/).

This module never imports `gatewayd.agents.runtime` (the runtime calls it, not the reverse).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prometheus_client import Gauge

from gatewayd.agents import outbox_schema
from gatewayd.agents.errors import AgentError
from gatewayd.agents.metrics import HOT
from protocols.link import DurableOutputs, OutputAddress, durable_target

logger = logging.getLogger(__name__)

AgentKey = tuple[str, str]

DEFAULT_MAX_UNDELIVERED = 10_000

# gatewayd_outbox_events_total{event}: plain counters read at scrape time (metrics.py).
_EVENTS = HOT.outbox
OUTBOX_UNDELIVERED = Gauge(
    "gatewayd_outbox_undelivered", "Durable outputs handed to a transport and not yet delivered"
)


class OutboxFullError(AgentError):
    """The agent already holds `max_undelivered` outputs its devices have not taken."""


class OutboxRow(NamedTuple):
    seq: int
    address: OutputAddress
    payload: bytes


class OutboxStore:
    """`_gw_outbox` of one agent; every method runs inside the caller's transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.execute(outbox_schema.SCHEMA)

    def append(self, address: OutputAddress, payload: bytes) -> int:
        """A new row; its seq is above every seq this file ever handed out."""
        cursor = self._db.execute(
            outbox_schema.INSERT, (address.transport, address.target, address.qos, payload)
        )
        seq = cursor.lastrowid
        assert seq is not None
        return seq

    def pending(self) -> list[OutboxRow]:
        """Every undelivered row, oldest first."""
        rows = self._db.execute(
            "SELECT seq, transport, target, qos, payload FROM _gw_outbox ORDER BY seq"
        ).fetchall()
        return [
            OutboxRow(seq, OutputAddress(t, target, qos), bytes(p))
            for seq, t, target, qos, p in rows
        ]

    def delete(self, seqs: list[int]) -> None:
        """Delete these rows: one statement when the seqs are one run without gaps (outputs
        are usually delivered in order), else one execution per seq. The table's highest row
        is kept by that statement (outbox_schema.py): if it was among `seqs` (fewer rows went
        than asked), the high-water mark is raised to the highest of `seqs` first, then the
        rest go (the only case that writes the mark: the table was left without newer rows)."""
        if not seqs:
            return
        wanted = set(seqs)
        low, high = min(wanted), max(wanted)
        if high - low + 1 == len(wanted):
            # Every seq from low to high is asked for (seqs are unique row ids): exact.
            params: list[tuple[int, ...]] = [(low,)] if low == high else [(low, high)]
        else:
            params = [(seq,) for seq in sorted(wanted)]
        form = len(params[0]) - 1  # 0: one seq per execution, 1: a run
        db = self._db
        if len(params) == 1:
            deleted = db.execute(outbox_schema.DELETE_BELOW_HIGHEST[form], params[0]).rowcount
        else:
            deleted = db.executemany(outbox_schema.DELETE_BELOW_HIGHEST[form], params).rowcount
        if deleted < len(wanted):
            db.execute(outbox_schema.RAISE_HIGH, (high,))
            db.executemany(outbox_schema.DELETE_ANY[form], params)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM _gw_outbox").fetchone()[0])


class OutboxIndex:
    """The gateway-wide list of agents that may hold undelivered outputs (a hint: each
    agent's own `_gw_outbox` is the truth). Thread-safe; every call may fsync, so the runtime
    calls it on its executor, never on the event loop."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous_full: bool = False) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous_full else 'NORMAL'}")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS _gw_outbox_index (agent_class TEXT NOT NULL, "
                "agent_id TEXT NOT NULL, PRIMARY KEY (agent_class, agent_id)) WITHOUT ROWID"
            )
        except sqlite3.Error:
            self._db.close()
            raise

    def mark(self, key: AgentKey) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO _gw_outbox_index (agent_class, agent_id) VALUES (?, ?)", key
            )

    def unmark(self, key: AgentKey) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM _gw_outbox_index WHERE agent_class = ? AND agent_id = ?", key
            )

    def marked(self) -> list[AgentKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_class, agent_id FROM _gw_outbox_index ORDER BY 1, 2"
            ).fetchall()
        return [(str(c), str(i)) for c, i in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(slots=True)
class Settlement:
    """Deletes to run when an agent's database closes (see `Outbox.settlement`)."""

    key: AgentKey
    seqs: list[int]
    may_unmark: bool
    unmarked: bool = False


@dataclass(slots=True)
class _AgentOutputs:
    """One agent's outputs as the runtime's memory knows them (survives hibernation)."""

    # handed to a transport, not delivered: seq -> transport name
    in_flight: dict[int, str] = field(default_factory=dict)
    parked: list[OutboxRow] = field(default_factory=list)  # its transport is not attached yet
    delivered: list[int] = field(default_factory=list)  # delivered; row not deleted yet
    deleting: list[int] = field(default_factory=list)  # deleted by the open transaction
    written_in_batch: int = 0  # rows of the open transaction (released after its commit)
    marked: bool = False  # known to be in the OutboxIndex
    recover: bool = False  # rows from an earlier run may be on disk, not yet resent
    on_delivered: Callable[[int], None] | None = None  # the transports' callback, made once

    def idle(self) -> bool:
        return not (self.in_flight or self.parked or self.delivered or self.recover)


class Outbox:
    """The runtime's side of durable outputs, for every agent (see the module docstring).

    The runtime's modules call, always on the event loop unless said otherwise:
    start-up: `open_index(path)` and `index.marked()` (executor), `recover(keys)`, then wake
    those agents;
    batch.py: `begin_batch` after BEGIN, `delete_delivered` after the batch's turns and
    `needs_mark` (then `mark` on the executor) before COMMIT, `committed(key, rows)` after it,
    `aborted(key)` if the batch is lost;
    turn.py: `write_turn_outputs` at the end of each successful turn, inside its savepoint;
    scheduler.py: `settlement` / `settle` (executor) / `settled` around closing a database.
    """

    def __init__(self, *, max_undelivered: int = DEFAULT_MAX_UNDELIVERED) -> None:
        if max_undelivered < 1:
            raise ValueError(f"outbox max_undelivered must be >= 1, got {max_undelivered}")
        self.max_undelivered = max_undelivered
        self._index: OutboxIndex | None = None
        self._agents: dict[AgentKey, _AgentOutputs] = {}
        self._sinks: dict[str, DurableOutputs] = {}
        self._undelivered = 0
        OUTBOX_UNDELIVERED.set_function(lambda: self._undelivered)

    @property
    def index(self) -> OutboxIndex:
        if self._index is None:
            raise RuntimeError("outbox: open_index() was not called (runtime not started)")
        return self._index

    def open_index(self, path: str | os.PathLike[str], *, synchronous_full: bool) -> None:
        """Executor only: open (create) the gateway-wide index file."""
        self._index = OutboxIndex(path, synchronous_full=synchronous_full)

    def close_index(self) -> None:
        """Executor only."""
        if self._index is not None:
            self._index.close()
            self._index = None

    # -- transports ---------------------------------------------------------------------

    def attach(self, sink: DurableOutputs) -> list[AgentKey]:
        """A transport with durable outputs started: hand it the rows that waited for it.
        Returns the agents whose rows must be read again from disk (their outputs were with a
        transport of that name that stopped): the runtime wakes them."""
        self._sinks[sink.transport] = sink
        for key, agent in list(self._agents.items()):
            waiting = [row for row in agent.parked if row.address.transport == sink.transport]
            if waiting:
                agent.parked = [r for r in agent.parked if r.address.transport != sink.transport]
                for row in waiting:
                    self._hand_over(key, agent, row)
        return [key for key, agent in self._agents.items() if agent.recover]

    def detach(self, sink: DurableOutputs) -> None:
        """The transport stopped: what it had not delivered is read again from disk on the
        agent's next batch (after a new transport of that name attached, see `attach`); a late
        delivery report from the old one is ignored (the output may then go twice)."""
        if self._sinks.get(sink.transport) is not sink:
            return
        del self._sinks[sink.transport]
        for agent in self._agents.values():
            lost = [seq for seq, name in agent.in_flight.items() if name == sink.transport]
            if lost:
                for seq in lost:
                    del agent.in_flight[seq]
                self._undelivered -= len(lost)
                agent.recover = True

    # -- start-up -----------------------------------------------------------------------

    def recover(self, keys: list[AgentKey]) -> None:
        """Start-up, with `index.marked()` (read on the executor): these agents may hold rows
        from the last run; each must be woken, and its first batch sends them (`recovered`)."""
        for key in keys:
            agent = self._agent(key)
            agent.marked = True
            agent.recover = True

    # -- inside a batch (event loop) ----------------------------------------------------

    def store(self, db: sqlite3.Connection) -> OutboxStore:
        return OutboxStore(db)

    def begin_batch(self, key: AgentKey, stores: dict[str, Any], db: sqlite3.Connection) -> None:
        """Right after the batch's BEGIN: on the agent's first wake after a restart, send its
        older outputs again (before any output of this batch, which leaves only after the
        commit). Writes nothing (the batch's first turn then needs no SAVEPOINT)."""
        agent = self._agents.get(key)
        if agent is None or not agent.recover:
            return
        self.recovered(key, self._store(stores, db))

    def delete_delivered(
        self, key: AgentKey, stores: dict[str, Any], db: sqlite3.Connection
    ) -> None:
        """After the batch's turns, before its COMMIT (in its transaction): delete the rows
        delivered so far (`committed` forgets them once the COMMIT returned)."""
        agent = self._agents.get(key)
        if agent is None or not agent.delivered:
            return
        agent.deleting = list(agent.delivered)
        self._store(stores, db).delete(agent.deleting)

    def write_turn_outputs(
        self,
        key: AgentKey,
        stores: dict[str, Any],
        db: sqlite3.Connection,
        outputs: list[Any],
        start: int,
    ) -> None:
        """At the end of a successful turn, inside its savepoint: every output for a device
        (a link with durable outputs) among `outputs[start:]` ((connection, data) pairs)
        becomes an outbox row of this transaction; its entry is replaced by the `OutboxRow`."""
        for position in range(start, len(outputs)):
            conn, data = outputs[position]
            if not isinstance(data, bytes | str):
                continue  # a close request
            target = durable_target(conn.link)
            if target is None:
                continue  # a live-only link (WebSocket)
            payload = data.encode("utf-8") if isinstance(data, str) else data
            seq = self.append(key, self._store(stores, db), target[1], payload)
            outputs[position] = (conn, OutboxRow(seq, target[1], payload))

    @staticmethod
    def _store(stores: dict[str, Any], db: sqlite3.Connection) -> OutboxStore:
        store = stores.get("outbox")
        if store is None:
            store = stores["outbox"] = OutboxStore(db)
        return store

    def recovered(self, key: AgentKey, store: OutboxStore) -> None:
        """First wake of an agent the index listed: resend its rows from the earlier run."""
        agent = self._agents.get(key)
        if agent is None or not agent.recover:
            return
        agent.recover = False
        rows = [row for row in store.pending() if row.seq not in agent.in_flight]
        if rows:
            logger.info(
                "outbox: %s/%r: sending %d undelivered outputs left by the previous run",
                key[0],
                key[1],
                len(rows),
            )
        for row in rows:
            _EVENTS["resent_after_restart"] += 1
            self._release(key, agent, row)
        self._forget_if_idle(key, agent)

    def append(
        self, key: AgentKey, store: OutboxStore, address: OutputAddress, payload: bytes
    ) -> int:
        """Write one output in the current turn; returns its seq."""
        agent = self._agent(key)
        held = len(agent.in_flight) + len(agent.parked) + agent.written_in_batch
        if held >= self.max_undelivered:
            _EVENTS["refused_full"] += 1
            raise OutboxFullError(
                f"agent {key[0]}/{key[1]!r} holds {held} outputs its devices have not taken "
                f"(agents.max_undelivered_outputs={self.max_undelivered}); this turn is rolled "
                f"back until they are delivered (is {address.transport} {address.target!r} "
                "reachable?)"
            )
        seq = store.append(address, payload)
        agent.written_in_batch += 1
        _EVENTS["written"] += 1
        return seq

    def needs_mark(self, key: AgentKey) -> bool:
        agent = self._agents.get(key)
        return agent is not None and agent.written_in_batch > 0 and not agent.marked

    def mark(self, key: AgentKey) -> None:
        """Executor only (it writes the index file): before the commit that needs it. Only
        sets a flag on the agent's entry (`needs_mark` said it exists): no dict changes off
        the loop."""
        self.index.mark(key)
        agent = self._agents.get(key)
        if agent is not None:
            agent.marked = True

    def committed(self, key: AgentKey, rows: list[OutboxRow]) -> None:
        """The batch committed: its deletes are done and its new rows may leave, in order."""
        agent = self._agents.get(key)
        if agent is None:
            return
        if agent.deleting:
            done = set(agent.deleting)
            agent.delivered = [seq for seq in agent.delivered if seq not in done]
            agent.deleting = []
        agent.written_in_batch = 0
        for row in rows:
            self._release(key, agent, row)
        self._forget_if_idle(key, agent)

    def aborted(self, key: AgentKey) -> None:
        """The batch's transaction is lost: its rows never existed, its deletes did not run."""
        agent = self._agents.get(key)
        if agent is not None:
            agent.written_in_batch = 0
            agent.deleting = []
            self._forget_if_idle(key, agent)

    def undelivered(self, key: AgentKey) -> int:
        agent = self._agents.get(key)
        return 0 if agent is None else len(agent.in_flight) + len(agent.parked)

    # -- hibernation and shutdown ---------------------------------------------------------

    def settlement(self, key: AgentKey) -> Settlement | None:
        """Loop: what to settle before the agent's database closes (None: nothing)."""
        agent = self._agents.get(key)
        if agent is None or not agent.marked:
            return None
        may_unmark = not (agent.in_flight or agent.parked or agent.written_in_batch)
        return Settlement(key, list(agent.delivered), may_unmark)

    def settle(self, settlement: Settlement, conn: sqlite3.Connection) -> None:
        """Executor only, just before the database closes (`conn` has no open transaction):
        delete the delivered rows; if none is left and nothing is on its way, the agent leaves
        the index."""
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        try:
            store = OutboxStore(conn)
            store.delete(list(settlement.seqs))
            left = store.count()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if left == 0 and settlement.may_unmark:
            self.index.unmark(settlement.key)
            settlement.unmarked = True

    def settled(self, settlement: Settlement) -> None:
        """Loop, after `settle` returned."""
        agent = self._agents.get(settlement.key)
        if agent is None:
            return
        done = set(settlement.seqs)
        agent.delivered = [seq for seq in agent.delivered if seq not in done]
        if settlement.unmarked:
            agent.marked = False
        self._forget_if_idle(settlement.key, agent)

    def needs_settling(self) -> list[AgentKey]:
        """Agents with delivered rows still on disk (for shutdown)."""
        return [key for key, agent in self._agents.items() if agent.delivered]

    def forget(self, key: AgentKey) -> None:
        """The agent was destroyed (its database deleted): nothing of it is owed anymore.
        Its index entry, if any, stays until the next start finds nothing (one needless wake):
        removing it here could race with a new agent of the same id marking it."""
        agent = self._agents.pop(key, None)
        if agent is not None:
            self._undelivered -= len(agent.in_flight)

    # -- internals ------------------------------------------------------------------------

    def _agent(self, key: AgentKey) -> _AgentOutputs:
        agent = self._agents.get(key)
        if agent is None:
            agent = self._agents[key] = _AgentOutputs()
        return agent

    def _forget_if_idle(self, key: AgentKey, agent: _AgentOutputs) -> None:
        if agent.idle() and agent.written_in_batch == 0 and not agent.marked:
            self._agents.pop(key, None)

    def _release(self, key: AgentKey, agent: _AgentOutputs, row: OutboxRow) -> None:
        if row.address.transport in self._sinks:
            self._hand_over(key, agent, row)
        else:
            agent.parked.append(row)

    def _hand_over(self, key: AgentKey, agent: _AgentOutputs, row: OutboxRow) -> None:
        sink = self._sinks[row.address.transport]
        agent.in_flight[row.seq] = row.address.transport
        self._undelivered += 1
        _EVENTS["handed_over"] += 1
        try:
            callback = agent.on_delivered
            if callback is None:
                callback = agent.on_delivered = self._on_delivered(key)
            sink.send_tracked(row.address, row.seq, row.payload, callback)
        except Exception:
            # The row stays on disk and in flight: it is sent again after a restart.
            logger.exception(
                "outbox: %s transport refused output %d of %s/%r; it stays on disk and is "
                "sent again after a restart",
                row.address.transport,
                row.seq,
                key[0],
                key[1],
            )

    def _on_delivered(self, key: AgentKey) -> Callable[[int], None]:
        def delivered(seq: int) -> None:
            agent = self._agents.get(key)
            if agent is None or seq not in agent.in_flight:
                return  # destroyed meanwhile, or a duplicate callback
            del agent.in_flight[seq]
            agent.delivered.append(seq)
            self._undelivered -= 1
            _EVENTS["delivered"] += 1

        return delivered
