"""gatewayd.client: talk to a gateway's agents over the JSON WebSocket protocol
(protocols/PROTOCOL.md) from Python — state sync, RPC, streaming RPC and chat.

    async with AgentClient("ws://127.0.0.1:8765", "thermostat", "living-room") as agent:
        print(agent.state)
        await agent.call("set_target", 22)

Only `websockets` and the standard library: an app or a script installs no more than that
(the browser twin of this package is `web/gatewayd.js`, served by the daemon at
`/client/gatewayd.js`). Must never import the daemon's own packages (`gatewayd.agents`,
`gatewayd.api`, `gatewayd.chat`, `engine`, `protocols`): it speaks the wire protocol only.
"""

from gatewayd.client.agent import AgentClient, RpcCall
from gatewayd.client.chat import ChatClient, ChatResponse
from gatewayd.client.errors import (
    BadArgumentsError,
    CallTimeoutError,
    ChatError,
    ClientError,
    ConnectionLostError,
    MethodNotFoundError,
    ProtocolError,
    ReadOnlyError,
    RemoteError,
    RpcError,
    StateRejectedError,
)
from gatewayd.client.sync import SyncAgentClient, SyncChatClient

__all__ = [
    "AgentClient",
    "BadArgumentsError",
    "CallTimeoutError",
    "ChatClient",
    "ChatError",
    "ChatResponse",
    "ClientError",
    "ConnectionLostError",
    "MethodNotFoundError",
    "ProtocolError",
    "ReadOnlyError",
    "RemoteError",
    "RpcCall",
    "RpcError",
    "StateRejectedError",
    "SyncAgentClient",
    "SyncChatClient",
]
