"""`Agent`: the base class an agent author subclasses, and the `@callable` decorator.

    from gatewayd.agents import Agent, callable

    class Counter(Agent):
        initial_state = {"count": 0}

        def on_message(self, conn, message):
            self.sql("INSERT INTO log (text) VALUES (?)", str(message))
            self.set_state({"count": self.state["count"] + 1})

        @callable
        def reset(self):
            self.set_state({"count": 0})
            return "ok"

Every hook may be a plain or an `async` function. Each event (message, connect, close, RPC,
schedule, queue item) is one *turn*: turns of one agent run one at a time in arrival order;
all SQL and state writes of a turn commit together, and nothing the turn sends leaves the
gateway before that commit.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from gatewayd.agents.connection import Connection

if TYPE_CHECKING:
    from gatewayd.agents.queue import QueueStore
    from gatewayd.agents.schedules import ScheduleStore
    from gatewayd.agents.storage import AgentDatabase

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class CallableInfo:
    streaming: bool = False
    description: str = ""


def callable(fn: F | None = None, *, streaming: bool = False, description: str = "") -> Any:
    """Mark an agent method as invokable by clients (JSON `gw.rpc`) and `runtime.call`.

    With `streaming=True` the method receives an `RpcStream` as its first argument and sends
    chunks with `stream.send(chunk)`; its return value is the final reply.
    """
    info = CallableInfo(streaming=streaming, description=description)

    def mark(method: F) -> F:
        if not builtins.callable(method):
            raise TypeError("@callable decorates methods")
        method.__gw_callable__ = info  # type: ignore[attr-defined]
        return method

    return mark(fn) if fn is not None else mark


def callable_info(method: Any) -> CallableInfo | None:
    return getattr(method, "__gw_callable__", None)


class RpcStream:
    """Handed to `@callable(streaming=True)` methods: `stream.send(chunk)` sends one chunk.

    Each chunk leaves once the writes before it are committed (a *commit point*: everything
    the turn wrote so far commits, then the chunk is released), not at the end of the turn;
    a failure later in the turn rolls back only what was written after the last chunk. With
    `durability="normal"` that happens inside `send()`. With "full" the commit fsyncs, which
    never runs on the event loop: `await stream.send(chunk)` to release the chunk at once (a
    chunk not awaited goes out at the next awaited one or when the turn ends).
    """

    __slots__ = ("_send", "chunks_sent")

    def __init__(self, send: Callable[[Any], Awaitable[None]]) -> None:
        self._send = send
        self.chunks_sent = 0

    def send(self, chunk: Any) -> Awaitable[None]:
        released = self._send(chunk)
        self.chunks_sent += 1
        return released


class AgentHost(Protocol):
    """What an `Agent` needs from the runtime that runs it: the whole surface between the two
    (the runtime gives each instance one, as `_gw_host`; agent.py imports no runtime module).
    Methods marked "in a turn" raise `NotInTurnError` when no turn of the agent is running."""

    @property
    def key(self) -> tuple[str, str]:
        """`(agent class name, agent id)`."""
        ...

    @property
    def state(self) -> Any: ...

    @property
    def engine(self) -> Any: ...

    @property
    def runtime(self) -> Any:
        """The `AgentRuntime` (other agents' `classes`, `call`, `run_in_agent`): for tools
        that reach other agents (a chat agent's devices)."""
        ...

    def set_state(self, new_state: Any, source: Connection | str) -> None:
        """In a turn: validate, persist, broadcast, notify."""
        ...

    def database(self) -> AgentDatabase:
        """In a turn: the agent's database, inside the turn's transaction."""
        ...

    def connections(self) -> list[Connection]:
        """The agent's open connections."""
        ...

    def schedule(self, when: Any, method: str, payload: Any, **options: Any) -> Any: ...

    def schedules(self) -> ScheduleStore: ...

    def cancel_schedule(self, schedule_id: str) -> bool: ...

    def queue_push(self, method: str, payload: Any, **options: Any) -> Any: ...

    def queue(self) -> QueueStore: ...

    async def retry(self, fn: Callable[[], Awaitable[Any] | Any], **options: Any) -> Any: ...

    def request_destroy(self) -> None:
        """In a turn: destroy the agent once the turn has committed."""
        ...

    def protocol_default(self, transport: str) -> bool: ...

    def submit(self, fn: Callable[[Agent], Any]) -> asyncio.Future[Any]:
        """From any task (not only a turn): queue `fn(agent)` as a turn of this agent, in its
        mailbox like any event; the future resolves to its result after the commit."""
        ...

    def start_task(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task of this agent, owned by the runtime: it runs outside any turn
        (storage only through `submit`), survives hibernation, is cancelled (and awaited) when
        the runtime closes, and its failure is logged. One running task per `name`."""
        ...

    def running_task(self, name: str) -> asyncio.Task[Any] | None:
        """The task `start_task(name, ...)` started, while it runs."""
        ...

    async def infer(self, model: str, inputs: Any, **kwargs: Any) -> Any: ...

    async def infer_many(self, model: str, requests: Sequence[Any], **kwargs: Any) -> list[Any]: ...

    def generate(self, prompt: Any, model: str | None, sampling: dict[str, Any]) -> Any:
        """A `gatewayd.generation.Generation` (an async iterator of deltas) on a local
        language model; `NoEngineError` when none (or no such one) is configured."""
        ...


class Agent:
    """Base class of all agents. See the module docstring for an example."""

    initial_state: ClassVar[Any] = None

    _gw_host: AgentHost

    # -- identity -------------------------------------------------------------------------

    @property
    def agent_class(self) -> str:
        return self._gw_host.key[0]

    @property
    def name(self) -> str:
        """The agent id (the SDK calls it `name`)."""
        return self._gw_host.key[1]

    @property
    def id(self) -> str:
        return self._gw_host.key[1]

    # -- hooks (override any; plain or async) ------------------------------------------------

    def on_start(self) -> Any:
        """Runs on every wake (first event after start-up or hibernation), as a turn."""

    def on_connect(self, conn: Connection, ctx: dict[str, Any]) -> Any:
        """A new connection; `ctx` carries transport facts (path, headers, peer)."""

    def on_message(self, conn: Connection, message: bytes | str) -> Any:
        """A message that is not a protocol frame: bytes as received, or text."""

    def on_close(self, conn: Connection, code: int, reason: str) -> Any:
        """The connection ended (either side)."""

    def on_error(self, err: BaseException) -> Any:
        """A turn, schedule, queue item or commit failed (after retries where they apply)."""
        logger.warning("agents: %s/%r: %s: %s", self.agent_class, self.id, type(err).__name__, err)

    def on_protocol_frame(self, conn: Connection, frame_type: str, frame: dict[str, Any]) -> Any:
        """A client protocol frame of a family the agent class speaks (`gw.chat.*`, see
        PROTOCOL.md); the gateway answers `gw.error` for it unless a subclass overrides this."""

    def validate_state_change(self, new_state: Any, source: Connection | str) -> None:
        """Synchronous gate before a state change; raise to reject it."""

    def on_state_changed(self, state: Any, source: Connection | str) -> Any:
        """Notification after a state change was written; its errors undo nothing."""

    def should_send_protocol_messages(self, conn: Connection, ctx: dict[str, Any]) -> bool:
        """Asked once per new connection before anything is sent to it."""
        return self._gw_host.protocol_default(conn.transport)

    def should_connection_be_readonly(self, conn: Connection, ctx: dict[str, Any]) -> bool:
        """Read-only connections may not change the agent's state (see PROTOCOL.md)."""
        return False

    def get_connection_tags(self, conn: Connection, ctx: dict[str, Any]) -> Iterable[str]:
        """Tags for `get_connections(tag=...)`, asked once per new connection."""
        return ()

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> Any:
        return self._gw_host.state

    def set_state(self, new_state: Any) -> None:
        """Replace (not merge) the state: validate -> persist -> broadcast -> notify."""
        self._gw_host.set_state(new_state, "server")

    # -- storage --------------------------------------------------------------------------------

    def sql(self, query: str, *params: Any) -> list[dict[str, Any]]:
        """One SQL statement with bound parameters, inside the current turn's transaction."""
        return self._gw_host.database().sql(query, params)

    # -- connections ------------------------------------------------------------------------------

    def get_connections(self, tag: str | None = None) -> list[Connection]:
        conns = self._gw_host.connections()
        if tag is None:
            return list(conns)
        return [conn for conn in conns if tag in conn.tags]

    def broadcast(
        self, message: bytes | str, without: Iterable[Connection | str] | None = None
    ) -> None:
        """Send to every connection of this agent (protocol-enabled or not) except `without`."""
        excluded = {c.id if isinstance(c, Connection) else c for c in (without or ())}
        for conn in self._gw_host.connections():
            if conn.id not in excluded:
                conn.send(message)

    # -- schedules, queue, retry (storage-backed, see runtime) ------------------------------

    def schedule(self, when: Any, method: str, payload: Any = None, **options: Any) -> Any:
        """Run `method(payload)` at `when`: delay seconds, an aware datetime, or a 5-field UTC
        cron string. Persisted, at-least-once, idempotent (registering the same schedule again
        returns the existing one), overdue ones run after a restart. Option `retry`: a
        `RetryPolicy` or `{"max_attempts", "base_delay_s", "max_delay_s"}`; after the last
        failed attempt `on_error` gets a `ScheduleFailedError`. Returns the `Schedule`."""
        return self._gw_host.schedule(when, method, payload, **options)

    def schedule_every(self, seconds: float, method: str, payload: Any = None, **kw: Any) -> Any:
        return self._gw_host.schedule(seconds, method, payload, every_s=seconds, **kw)

    def get_schedule(self, schedule_id: str) -> Any:
        return self._gw_host.schedules().get(schedule_id)

    def get_schedules(self, **criteria: Any) -> list[Any]:
        """Filter with `kind=` ("delayed", "at", "cron", "interval"), `method=`, `due_before=`."""
        return self._gw_host.schedules().list(**criteria)

    def cancel_schedule(self, schedule_id: str) -> bool:
        return self._gw_host.cancel_schedule(schedule_id)

    def queue(self, method: str, payload: Any = None, **options: Any) -> Any:
        """Persist a call of `method(payload)`; runs after this turn commits, in FIFO order
        (also drained whenever the agent wakes). Option `retry` as for `schedule`; an item
        that keeps failing becomes a dead letter (`get_queues(status="dead")`) and `on_error`
        gets a `QueueItemFailedError`. Returns the `QueueItem`."""
        return self._gw_host.queue_push(method, payload, **options)

    def dequeue(self, item_id: str) -> bool:
        return self._gw_host.queue().remove(item_id)

    def get_queue(self, item_id: str) -> Any:
        return self._gw_host.queue().get(item_id)

    def get_queues(self, **criteria: Any) -> list[Any]:
        """Filter with `method=`, `status=` ("pending" by default, "dead", or None for all)."""
        return self._gw_host.queue().list(**criteria)

    async def retry(
        self,
        fn: Callable[[], Awaitable[Any] | Any],
        *,
        max_attempts: int = 3,
        base_delay: float = 0.1,
        max_delay: float = 3.0,
        should_retry: Callable[[BaseException, int], bool] | None = None,
    ) -> Any:
        """Call `fn` until it succeeds: exponential backoff with full jitter."""
        return await self._gw_host.retry(
            fn,
            max_attempts=max_attempts,
            base_delay=base_delay,
            max_delay=max_delay,
            should_retry=should_retry,
        )

    # -- lifecycle, inference -------------------------------------------------------------------

    def destroy(self) -> None:
        """After this turn: close this agent's connections, delete its storage and schedules."""
        self._gw_host.request_destroy()

    @property
    def has_engine(self) -> bool:
        return self._gw_host.engine is not None

    def has_model(self, model: str) -> bool:
        """True when an engine is configured and (if it can tell) serves `model`."""
        engine = self._gw_host.engine
        if engine is None:
            return False
        names = getattr(engine, "model_names", None)
        return model in names() if builtins.callable(names) else True

    async def infer(self, model: str, inputs: Any, **kwargs: Any) -> Any:
        """Batched inference through the runtime's engine (`NoEngineError` without one)."""
        return await self._gw_host.infer(model, inputs, **kwargs)

    async def infer_many(self, model: str, requests: Sequence[Any], **kwargs: Any) -> list[Any]:
        """Several requests at once (a window of readings to score): their outputs, in order.
        The engine packs them into few batches and wakes this agent once per batch, not once
        per request; all or nothing (an invalid request fails the call, naming its index)."""
        return await self._gw_host.infer_many(model, requests, **kwargs)

    def generate(self, prompt: Any, *, model: str | None = None, **sampling: Any) -> Any:
        """Stream text from a local language model (`[generators.NAME]`; `model` defaults to
        the first one): `prompt` is a string or chat messages (`[{"role", "content"}]`),
        `sampling` takes `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop` ...

            async for delta in self.generate([{"role": "user", "content": "Hi"}]):
                text += delta.text            # delta.finish_reason on the last one

        or `text = await self.generate(prompt).text()`. A long generation belongs in a
        background task (`AgentHost.start_task`): a turn has `turn_timeout`. Breaking out of
        the loop cancels it. `NoEngineError` when no such model is configured."""
        return self._gw_host.generate(prompt, model, sampling)
