"""The runtime's records of one agent: its `Slot` (mailbox, instance, database, open batch),
the `Event`s in the mailbox and the `Turn` that is running.

Plain data with no behaviour beyond the output gate a `Connection` writes through
(`Slot.gate_output`). Imported by every runtime module; imports none of them (only the agent base
class and Connection).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gatewayd.agents.agent import Agent
from gatewayd.agents.connection import CloseRequest, Connection
from protocols.link import durable_target

if TYPE_CHECKING:
    from gatewayd.agents.storage import AgentDatabase

AgentKey = tuple[str, str]
"""`(agent class name, agent id)`: the identity of one agent."""

# Event kinds
START, CONNECT, MESSAGE, CLOSE, CALL, FN, ALARM, SCHEDULED = range(8)
EVENT_NAMES = ("start", "connect", "message", "close", "call", "fn", "alarm", "scheduled call")

Output = tuple[Connection, "bytes | str | CloseRequest"]
"""One buffered output of a batch: released to the transport after the batch commits."""

Done = tuple["asyncio.Future[Any] | None", Any, bool]
"""One event's outcome, settled after the commit: `(future, result or error, is_error)`."""


class Event:
    """One entry of an agent's mailbox; `a`, `b`, `c` depend on `kind` (see turn.py)."""

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


class Turn:
    """What one running turn may change besides SQL (undone when it rolls back)."""

    __slots__ = (
        "committing",
        "conn_undo",
        "destroy",
        "lost",
        "notifications",
        "outbox_mark",
        "readonly",
        "rpc_conn",
        "rpc_id",
        "savepoint",
        "source",
        "state_before",
    )

    def __init__(self, source: Connection | None) -> None:
        self.source = source
        # What a failure rolls back to: the outbox length and the agent state at the start
        # of the turn, or at its last commit point (a streaming RPC chunk, see batch.py).
        self.outbox_mark = 0
        self.state_before: Any = None
        # Set when a commit point of this turn failed: the batch's transaction is gone.
        self.lost: TransactionLost | None = None
        # The COMMIT of a commit point running off the loop (durability="full"), if any.
        self.committing: asyncio.Future[None] | None = None
        self.conn_undo: list[tuple[Connection, Any]] = []
        self.notifications: list[Any] = []
        self.readonly = False
        self.rpc_id: str | None = None
        self.rpc_conn: Connection | None = None
        self.destroy = False
        # Whether the turn runs in its own SAVEPOINT (see AgentDatabase.turn_savepoint).
        self.savepoint = True


class Slot:
    """One agent identity while it is awake or has events queued."""

    __slots__ = (
        "agent",
        "cls",
        "db",
        "defer_output",
        "destroy_requested",
        "done",
        "drain_queued",
        "index_dirty",
        "key",
        "last_active",
        "mailbox",
        "outbox",
        "room",
        "state",
        "state_changed",
        "stores",
        "task",
        "turn",
        "undo_conns",
    )

    def __init__(self, key: AgentKey, cls: type[Agent]) -> None:
        self.key = key
        self.cls = cls
        self.mailbox: deque[Event] = deque()
        self.task: asyncio.Task[None] | None = None
        self.agent: Agent | None = None
        self.db: AgentDatabase | None = None
        self.state: Any = None
        # Set by set_state; cleared after the commit that made the change durable (state
        # observers, see AgentRuntime.add_state_observer, are told then).
        self.state_changed = False
        self.turn: Turn | None = None
        # The open batch's buffered outputs (None between batches: output goes out at once).
        self.outbox: list[Output] | None = None
        # The open batch's events to settle after its commit, and connection states to
        # restore if it is lost (None between batches, like `outbox`).
        self.done: list[Done] | None = None
        self.undo_conns: list[tuple[Connection, Any]] | None = None
        # Set while the mailbox is full: resolved once it has room again (see scheduler.py).
        self.room: asyncio.Future[None] | None = None
        self.last_active = 0.0
        self.destroy_requested = False
        self.drain_queued = False
        self.index_dirty = False
        self.stores: dict[str, Any] = {}
        # Set by the scheduler: runs an output for a device that was sent outside any batch
        # in a turn of its own, so that it, too, becomes a durable outbox row (outbox.py).
        self.defer_output: Callable[[Connection, bytes | str], None] | None = None

    # -- connection.OutputGate ----------------------------------------------------------------

    def gate_output(self, conn: Connection, data: bytes | str | CloseRequest) -> bool:
        """Buffer `data` until the open batch commits; False when no batch is open."""
        outbox = self.outbox
        if outbox is None:
            defer = self.defer_output
            if defer is None or isinstance(data, CloseRequest) or durable_target(conn.link) is None:
                return False
            defer(conn, data)
            return True
        outbox.append((conn, data))
        return True

    def note_connection_state(self, conn: Connection, old_state: Any) -> None:
        """Remember `conn`'s state before a change, to restore it if the turn rolls back."""
        if self.turn is not None:
            self.turn.conn_undo.append((conn, old_state))


class TransactionLost(Exception):
    """The batch's transaction no longer exists; its turns must all fail."""


def overrides(cls: type, name: str) -> bool:
    """Whether the agent class `cls` overrides the base `Agent` hook `name`."""
    return getattr(cls, name) is not getattr(Agent, name)


async def maybe_await(value: Any) -> Any:
    if value is not None and inspect.isawaitable(value):
        return await value
    return value


def fail(future: asyncio.Future[Any] | None, err: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(err)
