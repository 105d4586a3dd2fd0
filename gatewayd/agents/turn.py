"""`TurnRunner`: one event as one turn, inside the batch's transaction.

A turn runs in its own SAVEPOINT: its SQL, state and connection-state changes are undone if
it fails, and its outputs (appended to the batch's outbox through the output gate) are
dropped with them. A turn that starts before any row of the batch's transaction changed (the
first turn of a batch, usually) needs no savepoint: undoing it is ROLLBACK and a new BEGIN
(`AgentDatabase.turn_savepoint`), which saves two statements on every batch of one turn.
What is released, and when, is batch.py's job (after the COMMIT, or at a commit point: a
streaming RPC chunk, after which a failure rolls back only what followed it).

Every hook the turn runs is bounded by `turn_timeout_s`: the handler (cancelled, the turn
rolled back), `on_state_changed` and `on_error` (cancelled and logged; they undo nothing).
Storage (`db_for_turn`, `set_state`) is for the task that runs the turn only, and the tasks it
creates while it runs (they inherit `_RUNNING_TURN`); anyone else gets `NotInTurnError`.

Event kinds and what `Event.a/b/c` carry:
  START (on_start), CONNECT (conn, a=context), MESSAGE (conn, a=data, b=DedupKey|None),
  CLOSE (conn, a=code, b=reason), CALL (a=method, b=args, c=kwargs), FN (a=fn(agent)),
  SCHEDULED (a=method name, b=payload); ALARM is expanded by alarms.py into SCHEDULED turns.

Imports no other runtime module but `slot`, `registry`, `rpc` and `metrics`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import json.encoder
import logging
import time
from collections.abc import Callable
from typing import Any

from gatewayd.agents.agent import Agent
from gatewayd.agents.connection import CloseRequest, Connection
from gatewayd.agents.errors import (
    AgentError,
    CommitError,
    NotInTurnError,
    ReadonlyConnectionError,
    SequenceGapError,
    StateRejectedError,
    TurnTimeoutError,
)
from gatewayd.agents.metrics import HOT
from gatewayd.agents.outbox import Outbox
from gatewayd.agents.registry import ConnectionRegistry
from gatewayd.agents.rpc import RpcDispatcher
from gatewayd.agents.settings import AgentSettings
from gatewayd.agents.slot import (
    CALL,
    CLOSE,
    CONNECT,
    EVENT_NAMES,
    FN,
    MESSAGE,
    SCHEDULED,
    START,
    Done,
    Event,
    Slot,
    TransactionLost,
    Turn,
    maybe_await,
    overrides,
)
from gatewayd.agents.storage import AgentDatabase
from protocols import jsonproto
from protocols.link import DedupKey, LinkRejected, Outcome

logger = logging.getLogger(__name__)


def _not_serialisable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# State as compact JSON, what json.dumps(state, separators=(",", ":"), ensure_ascii=False)
# gives, at half its cost: json.dumps builds a JSONEncoder, and that a C encoder, per call;
# this C encoder is made once (without the circular-reference check: a state that contains
# itself ends in RecursionError, refused the same way).
_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)  # None without _json
_C_ENCODER = (
    None
    if _MAKE_ENCODER is None
    else _MAKE_ENCODER(
        None, _not_serialisable, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
)
_PY_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_state(state: Any) -> str:
    """Compact JSON of an agent's state (TypeError/ValueError/RecursionError if it is not)."""
    if _C_ENCODER is None:
        return _PY_ENCODER.encode(state)
    return "".join(_C_ENCODER(state, 0))


# The turn the current asyncio task runs. A task inherits it from the task that created it,
# so a task an agent starts inside a turn (and awaits there) may use storage in that turn,
# while one still running after it (asyncio.create_task) cannot write into a later turn.
_RUNNING_TURN: contextvars.ContextVar[Turn | None] = contextvars.ContextVar(
    "gatewayd_running_turn", default=None
)


class TurnRunner:
    """Runs single turns and owns what only a running turn may do (SQL, set_state)."""

    def __init__(
        self,
        settings: AgentSettings,
        registry: ConnectionRegistry,
        rpc: RpcDispatcher,
        counters: dict[str, int],
        *,
        named_method: Callable[[Agent, Any], Any],
        outputs: Outbox,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.rpc = rpc
        self.counters = counters
        self._named_method = named_method
        self._outputs = outputs

    # -- one turn ----------------------------------------------------------------------------

    async def run(
        self,
        slot: Slot,
        event: Event,
        done: list[Done],
        undo_conns: list[tuple[Connection, Any]],
        *,
        report: bool = True,
    ) -> BaseException | None:
        """Run one event as a turn in its own SAVEPOINT; returns its error (rolled back)."""
        db = slot.db
        assert db is not None and slot.outbox is not None
        kind = event.kind
        dedup: DedupKey | None = event.b if kind == MESSAGE else None
        if dedup is not None:
            last = db.last_seq(dedup.stream)
            if last is not None and dedup.seq <= last:
                self.counters["duplicates_total"] += 1
                done.append((event.future, Outcome.DUPLICATE, False))
                return None
            if last is not None and dedup.seq > last + 1 and dedup.seq > dedup.resume_seq:
                # An earlier seq of this stream is still unapplied (its turn failed while this
                # one was in flight): applying this one now would make that one look like a
                # retransmission later and lose it. The sender resends both, in order.
                # Seqs below the sender's declared resume_seq are never coming: not a gap.
                done.append((event.future, SequenceGapError(dedup, last), True))
                return None
        started = time.perf_counter()
        turn = Turn(event.conn)
        slot.turn = turn
        running = _RUNNING_TURN.set(turn)
        if kind == CONNECT and event.future is not None:
            # If the batch is lost, `drop_failed_connects` (batch.py) finds the connection here.
            event.future._gw_connecting = event.conn  # type: ignore[attr-defined]
        turn.state_before = slot.state
        outbox = slot.outbox
        turn.outbox_mark = len(outbox)
        timeout_cm: asyncio.Timeout | None = None
        turn.savepoint = db.turn_savepoint()
        try:
            result = self._dispatch(slot, event, turn)
            if result is not None and inspect.isawaitable(result):
                timeout_cm = asyncio.timeout(self.settings.turn_timeout_s)
                async with timeout_cm:
                    result = await result
            if turn.committing is not None:
                await _commit_points_settled(turn)
            for note in turn.notifications:
                await self._notify_state_changed(slot, note)
            if turn.lost is not None:
                raise turn.lost  # a commit point failed, whatever the handler did with it
            # Outputs for devices become outbox rows of this turn (outbox.py): durable with it.
            self._outputs.write_turn_outputs(
                slot.key, slot.stores, db.connection, outbox, turn.outbox_mark
            )
            db.end_turn(turn.savepoint)
            if dedup is not None:
                # Applied: written with the batch, before its COMMIT (storage.py).
                db.set_last_seq(dedup.stream, dedup.seq)
        except Exception as raised:
            err: BaseException = raised
            if turn.committing is not None:  # a task of the turn may still be at one
                await _commit_points_settled(turn)
            if timeout_cm is not None and timeout_cm.expired():
                err = TurnTimeoutError(
                    f"agent {slot.key[0]}/{slot.key[1]!r}: {EVENT_NAMES[kind]} handler did not "
                    f"finish within agents.turn_timeout_s={self.settings.turn_timeout_s}s; "
                    "turn rolled back"
                )
                self.counters["turn_timeouts"] += 1
            del outbox[turn.outbox_mark :]
            slot.state = turn.state_before
            slot.turn = None
            slot.stores.clear()  # a store created in this turn may have lost its tables
            if turn.lost is not None or not db.connection.in_transaction:
                # SQLite rolled back the whole transaction (SQLITE_FULL, IOERR...): the
                # earlier turns of this batch are gone too.
                db.rollback()  # (forgets what the database remembered of the transaction)
                for conn, old_state in reversed(turn.conn_undo):
                    conn._state = old_state
                self.counters["turn_errors"] += 1
                if isinstance(err, TransactionLost):  # a commit point failed (batch.py)
                    err = CommitError(f"agent {slot.key[0]}/{slot.key[1]!r}: {err}")
                done.append((event.future, err, True))
                if turn.lost is not None:
                    raise TransactionLost(str(turn.lost)) from err
                raise TransactionLost(
                    f"transaction rolled back by SQLite in a {EVENT_NAMES[kind]} turn "
                    f"({type(err).__name__}: {err})"
                ) from err
            db.undo_turn(turn.savepoint)
            if dedup is not None and isinstance(err, LinkRejected):
                # The agent will never accept this message: its seq counts as consumed, or
                # every later seq of the stream would wait behind it forever.
                db.set_last_seq(dedup.stream, dedup.seq)
            for conn, old_state in reversed(turn.conn_undo):
                conn._state = old_state
            slot.turn = None
            self.counters["turn_errors"] += 1
            HOT.turns_error += 1
            HOT.latency_of(slot.key[0]).observe(time.perf_counter() - started)
            self._report_error(slot, event, turn, err)
            done.append((event.future, err, True))
            if kind == CONNECT and event.future is not None:
                self._refuse_connection(slot, event.conn, err)
            if report:
                await self.on_error_turn(slot, err)
            return err
        except BaseException:
            if db.connection.in_transaction:
                db.undo_turn(turn.savepoint)
            del outbox[turn.outbox_mark :]
            slot.state = turn.state_before
            raise
        finally:
            slot.turn = None
            _RUNNING_TURN.reset(running)
        undo_conns.extend(turn.conn_undo)
        if turn.destroy:
            slot.destroy_requested = True
        self.counters["turns_total"] += 1
        HOT.turns_ok += 1
        HOT.latency_of(slot.key[0]).observe(time.perf_counter() - started)
        if event.future is not None:
            if kind in (CALL, FN):
                done.append((event.future, result, False))
            else:
                done.append((event.future, Outcome.APPLIED, False))
        return None

    # -- dispatching one event ----------------------------------------------------------------

    def _dispatch(self, slot: Slot, event: Event, turn: Turn) -> Any:
        agent = slot.agent
        assert agent is not None
        kind = event.kind
        if kind == MESSAGE:
            conn = event.conn
            assert conn is not None
            data = event.a
            if type(data) is str:
                try:
                    frame = jsonproto.parse_client_text(data)
                except jsonproto.ProtocolError as err:
                    self.counters["protocol_errors"] += 1
                    if err.rpc_id is not None:
                        conn.send(jsonproto.encode_rpc_error(err.rpc_id, str(err)))
                    else:
                        conn.send(jsonproto.encode_error(str(err)))
                    return None
                if frame is not None:
                    if isinstance(frame, jsonproto.RpcRequest):
                        return self.rpc.handle_request(slot, agent, conn, frame, turn)
                    if isinstance(frame, jsonproto.ExtensionFrame):
                        return self._extension_frame(slot, agent, conn, frame)
                    return self._client_state_update(slot, conn, frame.state)
            return agent.on_message(conn, data)
        if kind == CONNECT:
            return self._connect(slot, agent, event.conn, event.a)
        if kind == CLOSE:
            conn = event.conn
            assert conn is not None
            self.registry.unregister(conn)
            return agent.on_close(conn, event.a, event.b)
        if kind == CALL:
            return self.rpc.call(agent, event.a, event.b, event.c)
        if kind == START:
            return agent.on_start()
        if kind == FN:
            return event.a(agent)
        if kind == SCHEDULED:
            return self._named_method(agent, event.a)(event.b)
        raise AgentError(f"event kind {EVENT_NAMES[kind]} is not supported")

    async def _connect(
        self, slot: Slot, agent: Agent, conn: Connection | None, context: dict[str, Any]
    ) -> None:
        assert conn is not None
        # Asked before anything is sent to the connection; the flags live on the Connection,
        # outside the agent instance, so they survive hibernation.
        conn.protocol_enabled = bool(
            await maybe_await(agent.should_send_protocol_messages(conn, context))
        )
        conn.readonly = bool(await maybe_await(agent.should_connection_be_readonly(conn, context)))
        conn._set_tags(await maybe_await(agent.get_connection_tags(conn, context)) or ())
        if conn.protocol_enabled:
            conn.send(jsonproto.encode_identity(slot.key[0], slot.key[1], conn.id))
            conn.send(jsonproto.encode_state(slot.state))
        await maybe_await(agent.on_connect(conn, context))

    def _refuse_connection(self, slot: Slot, conn: Connection | None, err: BaseException) -> None:
        if conn is None:
            return
        self.registry.unregister(conn)
        code = err.code if isinstance(err, LinkRejected) else 1011
        reason = err.reason if isinstance(err, LinkRejected) else "agent refused the connection"
        assert slot.outbox is not None
        slot.outbox.append((conn, CloseRequest(code, reason)))

    def _extension_frame(
        self, slot: Slot, agent: Agent, conn: Connection, frame: jsonproto.ExtensionFrame
    ) -> Any:
        """A `gw.chat.*`-like frame: the agent class's `on_protocol_frame`, when it has one."""
        if not overrides(slot.cls, "on_protocol_frame"):
            self.counters["protocol_errors"] += 1
            conn.send(
                jsonproto.encode_error(
                    f"unknown protocol frame type {frame.type!r}: agent {slot.key[0]} does not "
                    "speak it"
                )
            )
            return None
        return agent.on_protocol_frame(conn, frame.type, frame.body)

    def _client_state_update(self, slot: Slot, conn: Connection, new_state: Any) -> None:
        if conn.readonly:
            conn.send(jsonproto.encode_state_error("connection is read-only"))
            return
        try:
            self.set_state(slot, new_state, conn)
        except StateRejectedError as err:
            conn.send(jsonproto.encode_state_error(str(err)))

    # -- errors ---------------------------------------------------------------------------------

    def _report_error(self, slot: Slot, event: Event, turn: Turn, err: BaseException) -> None:
        what = EVENT_NAMES[event.kind]
        message = f"{what} failed: {type(err).__name__}: {err}"
        if turn.rpc_id is not None and turn.rpc_conn is not None:
            # RPC replies always flow, even on protocol-disabled connections.
            turn.rpc_conn.send(jsonproto.encode_rpc_error(turn.rpc_id, message))
        elif event.conn is not None and event.conn.protocol_enabled and event.kind == MESSAGE:
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

    async def on_error_turn(self, slot: Slot, err: BaseException) -> None:
        """on_error runs inside the batch's transaction in its own savepoint (it may log to
        SQL); its own failures are logged, never recursive."""
        agent = slot.agent
        db = slot.db
        if agent is None or db is None or not overrides(slot.cls, "on_error"):
            return
        turn = Turn(None)
        slot.turn = turn
        running = _RUNNING_TURN.set(turn)
        db.savepoint()
        try:
            async with asyncio.timeout(self.settings.turn_timeout_s):
                await maybe_await(agent.on_error(err))
            db.release()
        except Exception as failure:
            db.rollback_to_savepoint()
            self._log_hook_failure(slot, "on_error", failure, "its writes were rolled back")
        finally:
            slot.turn = None
            _RUNNING_TURN.reset(running)

    async def notify_error_outside_turn(self, slot: Slot, agent: Agent, err: BaseException) -> None:
        try:
            async with asyncio.timeout(self.settings.turn_timeout_s):
                await maybe_await(agent.on_error(err))
        except Exception as failure:
            self._log_hook_failure(slot, "on_error", failure, "ignored")

    def _log_hook_failure(self, slot: Slot, hook: str, failure: Exception, then: str) -> None:
        if isinstance(failure, TimeoutError):
            self.counters["turn_timeouts"] += 1
            logger.error(
                "agents: %s/%r: %s did not finish within agents.turn_timeout_s=%ss and was "
                "cancelled (%s); make it return sooner or move slow work to queue()",
                slot.key[0],
                slot.key[1],
                hook,
                self.settings.turn_timeout_s,
                then,
            )
        else:
            logger.error(
                "agents: %s/%r: %s itself failed (%s)", *slot.key, hook, then, exc_info=failure
            )

    # -- what only a running turn may do --------------------------------------------------------

    def current_turn(self, slot: Slot) -> Turn:
        """The running turn of the agent, if the calling task runs it; else NotInTurnError."""
        turn = slot.turn
        if turn is None or slot.db is None:
            raise NotInTurnError(
                f"agent {slot.key[0]}/{slot.key[1]!r}: storage used outside a turn; call it from "
                "a hook, a @callable, a scheduled or queued method"
            )
        if _RUNNING_TURN.get() is not turn:
            raise NotInTurnError(
                f"agent {slot.key[0]}/{slot.key[1]!r}: storage used from an asyncio task that "
                "does not run the current turn (one started with asyncio.create_task in an "
                "earlier turn?); await the task inside the turn that started it, or hand the "
                "write to a turn with queue() or schedule()"
            )
        if turn.committing is not None:
            raise AgentError(
                f"agent {slot.key[0]}/{slot.key[1]!r}: storage used while a streaming chunk of "
                "this turn is being committed; await stream.send(...) before writing again"
            )
        return turn

    def db_for_turn(self, slot: Slot) -> AgentDatabase:
        """The agent's database, or NotInTurnError unless the calling task runs its turn."""
        self.current_turn(slot)
        assert slot.db is not None
        return slot.db

    def set_state(self, slot: Slot, new_state: Any, source: Connection | str) -> None:
        """Validate -> persist -> broadcast -> queue the on_state_changed notification."""
        turn = self.current_turn(slot)
        db = slot.db
        assert db is not None and slot.agent is not None
        if turn.readonly:
            raise ReadonlyConnectionError(
                f"agent {slot.key[0]}/{slot.key[1]!r}: a read-only connection cannot change state"
            )
        if overrides(slot.cls, "validate_state_change"):
            try:
                slot.agent.validate_state_change(new_state, source)
            except Exception as err:
                raise StateRejectedError(f"state change rejected: {err}") from err
        try:
            state_json = encode_state(new_state)
        except (TypeError, ValueError, RecursionError) as err:
            raise StateRejectedError(f"state must be JSON-serialisable: {err}") from err
        db.save_state(state_json)
        slot.state = new_state
        slot.state_changed = True
        conns = self.registry.registered(slot.key)
        if conns:
            frame = None
            for conn in conns:
                if conn.protocol_enabled and conn is not source:
                    if frame is None:
                        frame = '{"type":"gw.state","state":' + state_json + "}"
                    conn.send(frame)
        if overrides(slot.cls, "on_state_changed"):
            turn.notifications.append((new_state, source))

    async def _notify_state_changed(self, slot: Slot, note: tuple[Any, Any]) -> None:
        """Run on_state_changed; it undoes nothing (the state change stands) whether it fails
        or runs past `turn_timeout_s` (then it is cancelled)."""
        agent = slot.agent
        assert agent is not None
        try:
            pending = agent.on_state_changed(*note)
            if pending is not None and inspect.isawaitable(pending):
                async with asyncio.timeout(self.settings.turn_timeout_s):
                    await pending
        except Exception as failure:
            self._log_hook_failure(slot, "on_state_changed", failure, "ignored")

    def request_destroy(self, slot: Slot) -> None:
        if slot.turn is None or _RUNNING_TURN.get() is not slot.turn:
            raise NotInTurnError("destroy() must be called from within a turn")
        slot.turn.destroy = True


async def _commit_points_settled(turn: Turn) -> None:
    """Wait until no commit point of `turn` (a streaming chunk committing off the loop, in a
    task the turn started) is in progress: the turn may end or roll back only after it."""
    while turn.committing is not None:
        await asyncio.wait([turn.committing])
