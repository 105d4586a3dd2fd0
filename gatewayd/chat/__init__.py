"""gatewayd.chat: chat agents — conversations in the agent's own SQLite, resumable streams,
tools with human approval, devices as tools.

    from gatewayd.chat import ChatAgent, OpenAICompatibleBackend

`ChatAgent` (agent.py) on top of the agent runtime; the message store and its row size guard
(store.py, guard.py); stored, resumable streams (streams.py); the tool loop (toolloop.py),
answers to waiting tool calls (approvals.py), devices as tools (devices.py), Code Mode (codemode.py); model backends
(backends.py, local.py, prompt_tools.py) and their TOML config (config.py); the history over
HTTP (http.py). The `gw.chat.*` wire frames live in `protocols.chat`.

Must never import the agent runtime's internals (only the public `gatewayd.agents` surface:
`Agent`, `Connection`, and the `AgentHost` hooks), nor the daemon's assembly
(`gatewayd.daemon`, `gatewayd.wiring`, `gatewayd.config`, `gatewayd.cli`), nor `engine`
directly (the local backend is handed a generator). `openai` is imported only when an
`OpenAICompatibleBackend` is created (an optional extra).
"""

from gatewayd.chat.agent import ChatAgent, ChatContext
from gatewayd.chat.backends import (
    EchoBackend,
    ModelBackend,
    OpenAICompatibleBackend,
    ScriptedBackend,
)
from gatewayd.chat.codemode import FencedPrograms
from gatewayd.chat.devices import AgentDevice, DeviceCommand
from gatewayd.chat.guard import MAX_MESSAGE_BYTES, guard_message
from gatewayd.chat.messages import InvalidMessageError, MessageBuilder
from gatewayd.chat.store import MessageStore

__all__ = [
    "MAX_MESSAGE_BYTES",
    "AgentDevice",
    "ChatAgent",
    "ChatContext",
    "DeviceCommand",
    "EchoBackend",
    "FencedPrograms",
    "InvalidMessageError",
    "MessageBuilder",
    "MessageStore",
    "ModelBackend",
    "OpenAICompatibleBackend",
    "ScriptedBackend",
    "guard_message",
]
