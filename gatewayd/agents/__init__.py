"""gatewayd.agents: stateful agents with Durable Object semantics.

    from gatewayd.agents import Agent, callable, Connection

One live instance per `(class, id)`, one event at a time, its own SQLite file, and an output
gate: nothing a turn sends (and no acknowledgement to a device) leaves before its writes commit.

Must never import the daemon's assembly (`gatewayd.daemon`, `gatewayd.wiring`,
`gatewayd.config`, `gatewayd.cli`): those build the runtime from `AgentSettings`. Transports
are reached only through `protocols.link`. Inside the package, `agent` and `connection` import
no runtime module (an `Agent` talks to the runtime through its `AgentHost`).
"""

from gatewayd.agents.agent import Agent, RpcStream, callable
from gatewayd.agents.connection import Connection
from gatewayd.agents.errors import (
    AgentError,
    CommitError,
    MailboxFullError,
    NoEngineError,
    NotInTurnError,
    ReadonlyConnectionError,
    RpcError,
    SequenceGapError,
    StateRejectedError,
    StorageError,
    StorageFullError,
    TurnTimeoutError,
    ValueTooLargeError,
)
from gatewayd.agents.runtime import AgentRuntime
from gatewayd.agents.settings import AgentSettings

__all__ = [
    "Agent",
    "AgentError",
    "AgentRuntime",
    "AgentSettings",
    "CommitError",
    "Connection",
    "MailboxFullError",
    "NoEngineError",
    "NotInTurnError",
    "ReadonlyConnectionError",
    "RpcError",
    "RpcStream",
    "SequenceGapError",
    "StateRejectedError",
    "StorageError",
    "StorageFullError",
    "TurnTimeoutError",
    "ValueTooLargeError",
    "callable",
]
