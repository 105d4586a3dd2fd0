"""The errors a client raises, one class per thing a caller may want to handle differently.

An RPC that fails on the gateway is answered with a text such as
`message failed: RpcError: agent thermostat has no method 'nope'` (the failed event's kind,
the exception's class, its message): `rpc_error()` turns it into the matching class, keeping
the remote exception's class name in `remote_type`.
"""

from __future__ import annotations

import re


class ClientError(Exception):
    """Base of every error of gatewayd.client."""


class ConnectionLostError(ClientError):
    """The connection closed before the answer came (the call may or may not have run)."""


class ProtocolError(ClientError):
    """The gateway answered with `gw.error` (a malformed or unknown frame), or closed the
    connection for good (unknown agent class, refused connection)."""


class StateRejectedError(ClientError):
    """The gateway refused this client's `set_state` (`gw.state_error`)."""


class ChatError(ClientError):
    """A `gw.chat.error`: a malformed chat frame, or a send while an answer streams."""


class RpcError(ClientError):
    """An RPC failed on the gateway. `method`, `remote_type` (the exception class on the
    gateway, e.g. "ValueError") and `detail` (its message) say which and why."""

    def __init__(self, method: str, message: str, remote_type: str = "", detail: str = "") -> None:
        super().__init__(f"{method}: {message}")
        self.method = method
        self.message = message
        self.remote_type = remote_type
        self.detail = detail or message


class MethodNotFoundError(RpcError):
    """No such method on the agent, or it is not marked `@callable`."""


class BadArgumentsError(RpcError):
    """The arguments do not fit the method's signature (the message shows it)."""


class CallTimeoutError(RpcError):
    """The method ran past the gateway's turn timeout."""


class ReadOnlyError(RpcError):
    """The connection is read-only and the method tried to change the agent's state."""


class RemoteError(RpcError):
    """The method itself raised; `remote_type` is the exception's class name."""


_ERROR_TEXT = re.compile(r"^(?:\w+ failed: )?(?P<type>[A-Za-z_][\w.]*): (?P<detail>.*)$", re.S)


def rpc_error(method: str, message: str) -> RpcError:
    """The typed error for the gateway's error text of a failed RPC."""
    match = _ERROR_TEXT.match(message)
    remote_type, detail = (match["type"], match["detail"]) if match else ("", message)
    cls: type[RpcError] = RemoteError
    if remote_type == "RpcError":
        if detail.startswith("bad arguments"):
            cls = BadArgumentsError
        elif (
            "has no method" in detail or "no callable method" in detail or "not @callable" in detail
        ):
            cls = MethodNotFoundError
    elif remote_type == "TurnTimeoutError":
        cls = CallTimeoutError
    elif remote_type == "ReadonlyConnectionError":
        cls = ReadOnlyError
    return cls(method, message, remote_type, detail)
