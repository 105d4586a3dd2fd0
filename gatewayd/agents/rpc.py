"""RPC: finding an agent's `@callable` method, checking arguments, and its replies/streams.

Used by the turn (turn.py) for `gw.rpc` frames from clients and for `runtime.call`. Every
reply goes out through the connection's output gate like any other output of the turn; each
chunk of a streaming method is followed by a *commit point* (`commit_point`, batch.py) that
commits the writes before it and releases it at once, instead of at the end of the turn.
Imports no other runtime module but `slot`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from gatewayd.agents.agent import Agent, RpcStream, callable_info
from gatewayd.agents.connection import Connection
from gatewayd.agents.errors import RpcError
from gatewayd.agents.slot import Slot, Turn
from protocols import jsonproto


class RpcDispatcher:
    """Looks up and invokes `@callable` methods (argument signatures are cached per class).

    `commit_point(slot, turn)` runs after each stream chunk was put in the outbox."""

    def __init__(self, commit_point: Callable[[Slot, Turn], Awaitable[None]]) -> None:
        self._signatures: dict[Any, inspect.Signature] = {}
        self._commit_point = commit_point

    def find_callable(self, agent: Agent, name: Any) -> Any:
        """The bound `@callable` method `name` of `agent`, or RpcError saying why not."""
        if not isinstance(name, str) or name.startswith("_"):
            raise RpcError(f"no callable method {name!r} on agent {agent.agent_class}")
        method = getattr(agent, name, None)
        if method is None:
            raise RpcError(f"agent {agent.agent_class} has no method {name!r}")
        if callable_info(method) is None:
            raise RpcError(f"method {name!r} of agent {agent.agent_class} is not @callable")
        return method

    def check_arguments(self, method: Any, name: str, args: Any, kwargs: Any) -> None:
        function = method.__func__
        signature = self._signatures.get(function)
        if signature is None:
            signature = self._signatures[function] = inspect.signature(method)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise RpcError(f"bad arguments for {name}{signature}: {err}") from None

    def call(self, agent: Agent, name: Any, args: Any, kwargs: Any) -> Any:
        """Invoke `name(*args, **kwargs)` for `runtime.call` (the result may be awaitable)."""
        method = self.find_callable(agent, name)
        self.check_arguments(method, name, args, kwargs)
        return method(*args, **kwargs)

    def handle_request(
        self,
        slot: Slot,
        agent: Agent,
        conn: Connection,
        request: jsonproto.RpcRequest,
        turn: Turn,
    ) -> Any:
        """Run a client's `gw.rpc` in `turn`; returns an awaitable when the method is async.
        The reply (and any stream chunk) is sent on `conn` through the output gate."""
        turn.rpc_id = request.id
        turn.rpc_conn = conn
        turn.readonly = conn.readonly
        method = self.find_callable(agent, request.method)
        info = callable_info(method)
        assert info is not None
        args: list[Any] = list(request.args)
        if info.streaming:
            rpc_id = request.id

            def send_chunk(chunk: Any) -> Awaitable[None]:
                conn.send(jsonproto.encode_rpc_chunk(rpc_id, chunk))
                return self._commit_point(slot, turn)

            args.insert(0, RpcStream(send_chunk))
        self.check_arguments(method, request.method, args, request.kwargs)
        result = method(*args, **request.kwargs)
        if result is not None and inspect.isawaitable(result):
            return _finish(conn, request.id, result)
        conn.send(encode_rpc_result(request.id, result))
        return None


async def _finish(conn: Connection, rpc_id: str, pending: Any) -> None:
    conn.send(encode_rpc_result(rpc_id, await pending))


def encode_rpc_result(rpc_id: str, result: Any) -> str:
    try:
        return jsonproto.encode_rpc_result(rpc_id, result)
    except (TypeError, ValueError) as err:
        raise RpcError(f"result of RPC {rpc_id!r} is not JSON-serialisable: {err}") from err
