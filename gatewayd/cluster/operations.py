"""Named, typed operations on one agent, run as a turn of that agent by the member that serves
it (`runtime.run_in_agent(agent_class, agent_id, operation)`).

A plain function passed to `run_in_agent` runs in this process; in cluster mode the agent may
be served by another member, and code never travels over NATS. An `AgentOperation` is data:
a registered name and JSON-able fields (a frozen dataclass). It is callable like the function
it replaces, so the single-box runtime runs it unchanged; `cluster.rpc.RoutedRuntime` sends
`{"name", "args"}` to the agent's owner, which rebuilds it from `OPERATIONS` (a name it does
not know, or arguments that do not fit, are refused) and runs it there. Results are plain
JSON data either way.

Used outside cluster mode too (the MCP tool groups, the chat messages route): imports nothing
of the cluster (no NATS), nor the daemon's assembly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast, dataclass_transform

from gatewayd.agents.storage import agent_db_path
from gatewayd.mcp.agent_index import AgentIndex, last_seen
from gatewayd.mcp.jsonable import jsonable

_T = TypeVar("_T")
_C = TypeVar("_C", bound="type[Any]")


class _Registry(Generic[_T]):
    """Registered classes by their `name`, rebuilt from a request's `{"name", "args"}`; `kind`
    names them in errors ("agent operation", "member query")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.classes: dict[str, type[_T]] = {}

    def register(self, cls: _C) -> _C:
        name = getattr(cls, "name", "")
        assert name and name not in self.classes, cls
        self.classes[name] = cls
        return cls

    def build(self, name: str, args: Any) -> _T:
        """The instance a request names; `ValueError` naming what does not fit."""
        cls = self.classes.get(name)
        if cls is None:
            known = ", ".join(self.classes)
            raise ValueError(f"unknown {self.kind} {name!r} (known: {known})")
        if not isinstance(args, dict):
            raise ValueError(f"{self.kind} {name!r}: args must be an object, got {args!r}")
        try:
            return cls(**args)
        except TypeError as err:
            raise ValueError(f"{self.kind} {name!r}: {err}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class _Named:
    """What travels over NATS: a registered `name` and the JSON-able fields (`args()`)."""

    name: ClassVar[str] = ""

    def args(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, slots=True)
class AgentOperation(_Named):
    """One operation; subclasses (declared with `@_operation`) set `name`, declare their
    arguments as fields and implement `__call__(agent)` returning plain JSON data."""

    def __call__(self, agent: Any) -> Any:
        raise NotImplementedError


_OPERATIONS: _Registry[AgentOperation] = _Registry("agent operation")
OPERATIONS: dict[str, type[AgentOperation]] = _OPERATIONS.classes


@dataclass_transform(frozen_default=True)
def _operation(cls: _C) -> _C:
    """Declare and register an operation: a frozen dataclass (with slots) of its arguments."""
    return _OPERATIONS.register(cast(_C, dataclasses.dataclass(frozen=True, slots=True)(cls)))


def operation_from(name: str, args: Any) -> AgentOperation:
    """The operation a forwarded request names; `ValueError` naming what does not fit."""
    return _OPERATIONS.build(name, args)


async def agent_exists(runtime: Any, agent_class: str, agent_id: str) -> bool:
    """Whether the agent has stored state (asking never creates it): the member serving it
    answers when `runtime` routes calls (`cluster.rpc.RoutedRuntime.agent_exists`), else this
    process's state directory. `ValueError` for a malformed agent id."""
    routed = getattr(runtime, "agent_exists", None)
    if routed is not None:
        return bool(await routed(agent_class, agent_id))
    return stored_here(runtime, agent_class, agent_id)


def stored_here(runtime: Any, agent_class: str, agent_id: str) -> bool:
    return agent_db_path(runtime.settings.state_dir, agent_class, agent_id).exists()


# -- the operations ----------------------------------------------------------------------------


@_operation
class ListSchedules(AgentOperation):
    name: ClassVar[str] = "schedules.list"

    def __call__(self, agent: Any) -> Any:
        return jsonable(agent.get_schedules())


@_operation
class CancelSchedule(AgentOperation):
    name: ClassVar[str] = "schedules.cancel"
    schedule_id: str

    def __call__(self, agent: Any) -> bool:
        return bool(agent.cancel_schedule(self.schedule_id))


@_operation
class ListQueue(AgentOperation):
    name: ClassVar[str] = "queue.list"
    status: Literal["pending", "dead"] | None = "pending"

    def __call__(self, agent: Any) -> Any:
        return jsonable(agent.get_queues(status=self.status))


@_operation
class RemoveQueueItem(AgentOperation):
    name: ClassVar[str] = "queue.remove"
    item_id: str

    def __call__(self, agent: Any) -> bool:
        return bool(agent.dequeue(self.item_id))


@_operation
class RequeueDeadItem(AgentOperation):
    name: ClassVar[str] = "queue.requeue_dead"
    item_id: str

    def __call__(self, agent: Any) -> bool:
        return bool(agent._gw_host.queue().requeue(self.item_id, now=time.time()))


@_operation
class SendToConnections(AgentOperation):
    """Send `text` to each open connection of the agent (or to `connection_id` only), as an
    output of the turn; the ids it went to."""

    name: ClassVar[str] = "connections.send"
    text: str
    connection_id: str | None = None

    def __call__(self, agent: Any) -> list[str]:
        conns = [
            conn
            for conn in agent.get_connections()
            if self.connection_id is None or conn.id == self.connection_id
        ]
        for conn in conns:
            conn.send(self.text)
        return [str(conn.id) for conn in conns]


@_operation
class ChatMessages(AgentOperation):
    """A chat agent's stored conversation (`ChatAgent.messages`), oldest first."""

    name: ClassVar[str] = "chat.messages"

    def __call__(self, agent: Any) -> Any:
        return jsonable(agent.messages)


class AgentUnavailableError(RuntimeError):
    """No member served the agent's partition within the call's timeout (cluster mode; the
    routes that catch it answer 503 with Retry-After)."""

    def __init__(self, agent_class: str, agent_id: str, timeout_s: float, reason: str) -> None:
        super().__init__(
            f"agent {agent_class}/{agent_id!r}: no member served it within {timeout_s:.0f}s "
            f"({reason})"
        )
        self.agent_class = agent_class
        self.agent_id = agent_id
        self.reason = reason


# -- the dashboard's operations ----------------------------------------------------------------


@_operation
class DashboardAgent(AgentOperation):
    """What the dashboard's agent page shows of the agent itself: state, schedules, queue,
    dead letters, failed schedule occurrences, open connections (those of the member that
    serves it)."""

    name: ClassVar[str] = "dashboard.agent"

    def __call__(self, agent: Any) -> Any:
        queue = agent.get_queues(status=None)
        # Schedule occurrences that used up their retries (no public Agent accessor yet).
        failures = agent._gw_host.schedules().failures()
        return jsonable(
            {
                "state": agent.state,
                "schedules": [_schedule_json(s) for s in agent.get_schedules()],
                "queue": [_queue_json(q) for q in queue if q.status != "dead"],
                "dead_letters": [_queue_json(q) for q in queue if q.status == "dead"],
                "schedule_failures": [_failure_json(f) for f in failures[-50:]],
                "connections": [_connection_json(c) for c in agent.get_connections()],
            }
        )


@_operation
class ReplayDeadLetter(AgentOperation):
    """Put a dead letter back in the agent's queue (a new item, same method and payload);
    False when the agent has no such dead letter."""

    name: ClassVar[str] = "dashboard.replay"
    item_id: str

    def __call__(self, agent: Any) -> bool:
        item = agent.get_queue(self.item_id)
        if item is None or item.status != "dead":
            return False
        agent.dequeue(self.item_id)
        options = {} if item.retry is None else {"retry": item.retry}
        agent.queue(item.method, item.payload, **options)
        return True


def _schedule_json(s: Any) -> dict[str, Any]:
    return {
        "id": s.id,
        "method": s.method,
        "kind": s.kind,
        "next_at": s.time,
        "cron": s.cron,
        "every_s": s.every_s,
        "status": s.status,
        "attempts": s.attempts,
        "last_error": s.last_error,
    }


def _queue_json(q: Any) -> dict[str, Any]:
    return {
        "id": q.id,
        "method": q.method,
        "payload": q.payload,
        "status": q.status,
        "attempts": q.attempts,
        "ready_at": q.ready_at,
        "last_error": q.last_error,
        "created_at": q.created_at,
        "dead_at": q.dead_at,
    }


def _failure_json(f: Any) -> dict[str, Any]:
    return {
        "id": f.id,
        "schedule_id": f.schedule_id,
        "method": f.method,
        "attempts": f.attempts,
        "error": f.error,
        "failed_at": f.failed_at,
    }


def _connection_json(c: Any) -> dict[str, Any]:
    return {
        "id": c.id,
        "transport": c.transport,
        "remote": c.remote,
        "tags": list(c.tags),
        "readonly": c.readonly,
        "protocol": c.protocol_enabled,
    }


# -- questions every member answers for itself -------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class MemberQuery(_Named):
    """A question about what one member holds (the agents it serves, its open connections),
    asked of every live member by the group-wide views (`ask_group`). Like an operation it is
    data: a registered name and JSON-able fields; subclasses (declared with `@_query`) implement
    `answer(runtime, serves)` returning plain JSON data, where `serves(agent_id)` says
    whether this member serves the agent (always True outside cluster mode)."""

    async def answer(self, runtime: Any, serves: Callable[[str], bool]) -> Any:
        raise NotImplementedError


_QUERIES: _Registry[MemberQuery] = _Registry("member query")
QUERIES: dict[str, type[MemberQuery]] = _QUERIES.classes


@dataclass_transform(frozen_default=True)
def _query(cls: _C) -> _C:
    """Declare and register a member query: a frozen dataclass (with slots) of its arguments."""
    return _QUERIES.register(cast(_C, dataclasses.dataclass(frozen=True, slots=True)(cls)))


def query_from(name: str, args: Any) -> MemberQuery:
    """The query a request names; `ValueError` naming what does not fit."""
    return _QUERIES.build(name, args)


@dataclasses.dataclass(frozen=True, slots=True)
class GroupAnswer:
    """Each member's answer by name (`None`: a single gateway, not a group), and the live
    members that did not answer in time, with why."""

    answers: dict[str | None, Any]
    missing: dict[str, str]

    @property
    def grouped(self) -> bool:
        return None not in self.answers

    def missing_json(self) -> list[dict[str, str]]:
        return [{"member": name, "reason": why} for name, why in sorted(self.missing.items())]


async def ask_group(runtime: Any, query: MemberQuery) -> GroupAnswer:
    """`query` answered by every live member when `runtime` routes calls
    (`cluster.rpc.RoutedRuntime.ask_members`), else by this process alone."""
    ask = getattr(runtime, "ask_members", None)
    if ask is not None:
        answer = await ask(query)
        assert isinstance(answer, GroupAnswer)
        return answer
    return GroupAnswer({None: await query.answer(runtime, lambda _agent_id: True)}, {})


def _id_filter(contains: str, ignore_case: bool) -> Callable[[str], bool]:
    """Whether an agent id contains `contains` (in any case, with `ignore_case`)."""
    if not ignore_case:
        return lambda agent_id: contains in agent_id
    needle = contains.lower()
    return lambda agent_id: needle in agent_id.lower()


@_query
class StoredAgents(MemberQuery):
    """The agents with stored state that this member serves, of `classes`, whose id contains
    `contains` (in any case with `ignore_case`: the dashboard's search) (at most `limit`,
    sorted by class then id), each awake or not and when last seen; and whether more
    matched."""

    name: ClassVar[str] = "agents.stored"
    classes: list[str]
    contains: str = ""
    limit: int = 100
    ignore_case: bool = False

    async def answer(self, runtime: Any, serves: Callable[[str], bool]) -> Any:
        index = AgentIndex(runtime.settings.state_dir)
        matches = _id_filter(self.contains, self.ignore_case)
        found, more = await index.find(
            self.classes,
            "",
            self.limit,
            keep=lambda agent_id: matches(agent_id) and serves(agent_id),
        )
        return {
            "agents": [
                {
                    "agent_class": agent.agent_class,
                    "agent_id": agent.agent_id,
                    "awake": runtime.is_awake(agent.agent_class, agent.agent_id),
                    "last_seen": agent.last_seen,
                }
                for agent in found
            ],
            "truncated": more,
        }


@_query
class OpenConnections(MemberQuery):
    """The connections open on this member (any transport) of agents of `classes` whose id
    contains `contains` (in any case with `ignore_case`), sorted by class, id and connection id."""

    name: ClassVar[str] = "connections.open"
    classes: list[str]
    contains: str = ""
    agent_id: str | None = None  # only this agent's
    ignore_case: bool = False  # `contains` in any case

    async def answer(self, runtime: Any, serves: Callable[[str], bool]) -> Any:
        classes = set(self.classes)
        matches = _id_filter(self.contains, self.ignore_case)
        rows = [
            {
                "agent_class": key[0],
                "agent_id": key[1],
                "connection_id": conn.id,
                "transport": conn.transport,
                "remote": conn.remote,
                "tags": list(conn.tags),
            }
            for key, conn in runtime.open_connections()
            if key[0] in classes
            and matches(key[1])
            and (self.agent_id is None or key[1] == self.agent_id)
        ]
        rows.sort(key=lambda row: (row["agent_class"], row["agent_id"], row["connection_id"]))
        return rows


@_query
class AgentLastSeen(MemberQuery):
    """When the agent last committed, as this member's copy says (None when this member
    does not serve it or holds no copy)."""

    name: ClassVar[str] = "agents.last_seen"
    agent_class: str
    agent_id: str

    async def answer(self, runtime: Any, serves: Callable[[str], bool]) -> Any:
        if not serves(self.agent_id):
            return None
        path = agent_db_path(runtime.settings.state_dir, self.agent_class, self.agent_id)
        return last_seen(path) if path.exists() else None
