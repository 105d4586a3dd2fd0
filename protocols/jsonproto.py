"""The JSON protocol spoken on text frames between JSON clients and agents (pure, no I/O).

Protocol frames are JSON objects whose `type` starts with the reserved prefix `gw.`; every
other text (plain text, JSON without a `gw.` type) is user data and passes through to the
agent's `on_message`. See protocols/PROTOCOL.md for the full specification.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PREFIX = "gw."
_MARKER = '"' + PREFIX

# server -> client
IDENTITY = "gw.identity"
STATE = "gw.state"
STATE_ERROR = "gw.state_error"
RPC_RESULT = "gw.rpc_result"
ERROR = "gw.error"
# client -> server
SET_STATE = "gw.set_state"
RPC = "gw.rpc"

MAX_RPC_ID_CHARS = 128

# Families of protocol frames handled by an agent class rather than by the gateway itself
# (`Agent.on_protocol_frame`): `gw.chat.*` are the chat agent's (see PROTOCOL.md, "Chat").
EXTENSION_PREFIXES = ("gw.chat.",)


class ProtocolError(ValueError):
    """A text frame claimed to be a protocol frame but is malformed; safe to show the peer."""

    def __init__(self, message: str, rpc_id: str | None = None) -> None:
        super().__init__(message)
        self.rpc_id = rpc_id


@dataclass(frozen=True, slots=True)
class RpcRequest:
    id: str
    method: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StateUpdate:
    state: Any


@dataclass(frozen=True, slots=True)
class ExtensionFrame:
    """A frame of an `EXTENSION_PREFIXES` family: `type` and the whole decoded object."""

    type: str
    body: dict[str, Any]


ClientFrame = RpcRequest | StateUpdate | ExtensionFrame


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def parse_client_text(text: str) -> ClientFrame | None:
    """Return the protocol frame in `text`, or None when `text` is user data.

    Raises `ProtocolError` for text that is meant as a protocol frame (a JSON object whose
    `type` starts with `gw.`, or text that mentions `"gw.` but is not valid JSON) yet cannot
    be used.
    """
    # Cheap reject first: user data almost never contains the reserved marker.
    if _MARKER not in text:
        return None
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return None
    try:
        obj = json.loads(stripped)
    except ValueError as err:
        raise ProtocolError(f"malformed JSON protocol frame: {err}") from None
    if not isinstance(obj, dict):
        return None
    frame_type = obj.get("type")
    if not isinstance(frame_type, str) or not frame_type.startswith(PREFIX):
        return None
    if frame_type == RPC:
        return _parse_rpc(obj)
    if frame_type == SET_STATE:
        if "state" not in obj:
            raise ProtocolError("gw.set_state needs a 'state' field")
        return StateUpdate(obj["state"])
    if frame_type.startswith(EXTENSION_PREFIXES):
        return ExtensionFrame(frame_type, obj)
    raise ProtocolError(
        f"unknown protocol frame type {frame_type!r}; clients may send {RPC!r} or {SET_STATE!r}"
    )


def _parse_rpc(obj: dict[str, Any]) -> RpcRequest:
    rpc_id = obj.get("id")
    if not isinstance(rpc_id, str | int) or isinstance(rpc_id, bool):
        raise ProtocolError("gw.rpc needs an 'id' (string or integer) to match the reply")
    rpc_id = str(rpc_id)
    if len(rpc_id) > MAX_RPC_ID_CHARS:
        raise ProtocolError(f"gw.rpc 'id' longer than {MAX_RPC_ID_CHARS} characters")
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise ProtocolError("gw.rpc needs a non-empty string 'method'", rpc_id)
    args = obj.get("args", [])
    if not isinstance(args, list):
        raise ProtocolError("gw.rpc 'args' must be a JSON array", rpc_id)
    kwargs = obj.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ProtocolError("gw.rpc 'kwargs' must be a JSON object", rpc_id)
    return RpcRequest(rpc_id, method, args, kwargs)


# -- encoders (server -> client) ------------------------------------------------------------


def encode_identity(agent_class: str, agent_id: str, connection_id: str) -> str:
    return _dumps(
        {"type": IDENTITY, "agent": agent_class, "id": agent_id, "connection": connection_id}
    )


def encode_state(state: Any) -> str:
    """Raises TypeError/ValueError when `state` is not JSON."""
    return _dumps({"type": STATE, "state": state})


def encode_state_error(message: str) -> str:
    return _dumps({"type": STATE_ERROR, "error": message})


def encode_rpc_result(rpc_id: str, result: Any) -> str:
    """The final reply of an RPC. Raises TypeError/ValueError when `result` is not JSON."""
    return _dumps({"type": RPC_RESULT, "id": rpc_id, "ok": True, "done": True, "result": result})


def encode_rpc_chunk(rpc_id: str, chunk: Any) -> str:
    return _dumps({"type": RPC_RESULT, "id": rpc_id, "ok": True, "done": False, "chunk": chunk})


def encode_rpc_error(rpc_id: str, message: str) -> str:
    return _dumps({"type": RPC_RESULT, "id": rpc_id, "ok": False, "done": True, "error": message})


def encode_error(message: str) -> str:
    return _dumps({"type": ERROR, "error": message})


def decode_server_text(text: str) -> dict[str, Any] | None:
    """For clients and tests: the protocol frame in a server text frame, or None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, dict) and str(obj.get("type", "")).startswith(PREFIX):
        return obj
    return None
