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
from typing import Any, ClassVar, Literal, TypeVar

from gatewayd.agents.storage import agent_db_path
from gatewayd.mcp.jsonable import jsonable

_Op = TypeVar("_Op", bound="type[AgentOperation]")


@dataclasses.dataclass(frozen=True, slots=True)
class AgentOperation:
    """One operation; subclasses set `name`, declare their arguments as fields and implement
    `__call__(agent)` returning plain JSON data."""

    name: ClassVar[str] = ""

    def __call__(self, agent: Any) -> Any:
        raise NotImplementedError

    def args(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


OPERATIONS: dict[str, type[AgentOperation]] = {}


def _register(cls: _Op) -> _Op:
    assert cls.name and cls.name not in OPERATIONS, cls
    OPERATIONS[cls.name] = cls
    return cls


def operation_from(name: str, args: Any) -> AgentOperation:
    """The operation a forwarded request names; `ValueError` naming what does not fit."""
    cls = OPERATIONS.get(name)
    if cls is None:
        raise ValueError(f"unknown agent operation {name!r} (known: {', '.join(OPERATIONS)})")
    if not isinstance(args, dict):
        raise ValueError(f"agent operation {name!r}: args must be an object, got {args!r}")
    try:
        return cls(**args)
    except TypeError as err:
        raise ValueError(f"agent operation {name!r}: {err}") from None


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


@_register
@dataclasses.dataclass(frozen=True, slots=True)
class ListSchedules(AgentOperation):
    name: ClassVar[str] = "schedules.list"

    def __call__(self, agent: Any) -> Any:
        return jsonable(agent.get_schedules())


@_register
@dataclasses.dataclass(frozen=True, slots=True)
class CancelSchedule(AgentOperation):
    name: ClassVar[str] = "schedules.cancel"
    schedule_id: str

    def __call__(self, agent: Any) -> bool:
        return bool(agent.cancel_schedule(self.schedule_id))


@_register
@dataclasses.dataclass(frozen=True, slots=True)
class ListQueue(AgentOperation):
    name: ClassVar[str] = "queue.list"
    status: Literal["pending", "dead"] | None = "pending"

    def __call__(self, agent: Any) -> Any:
        return jsonable(agent.get_queues(status=self.status))


@_register
@dataclasses.dataclass(frozen=True, slots=True)
class RemoveQueueItem(AgentOperation):
    name: ClassVar[str] = "queue.remove"
    item_id: str

    def __call__(self, agent: Any) -> bool:
        return bool(agent.dequeue(self.item_id))


@_register
@dataclasses.dataclass(frozen=True, slots=True)
class RequeueDeadItem(AgentOperation):
    name: ClassVar[str] = "queue.requeue_dead"
    item_id: str

    def __call__(self, agent: Any) -> bool:
        return bool(agent._gw_host.queue().requeue(self.item_id, now=time.time()))


@_register
@dataclasses.dataclass(frozen=True, slots=True)
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


@_register
@dataclasses.dataclass(frozen=True, slots=True)
class ChatMessages(AgentOperation):
    """A chat agent's stored conversation (`ChatAgent.messages`), oldest first."""

    name: ClassVar[str] = "chat.messages"

    def __call__(self, agent: Any) -> Any:
        return jsonable(agent.messages)
