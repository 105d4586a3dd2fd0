"""In-process calls of an agent another member serves, forwarded over NATS request/reply.

Every member answers requests on its own subject `gw.<group>.rpc.<member>` (it is on NATS
anyway; no HTTP hop, no address to advertise). `RoutedRuntime` wraps the agent runtime for
the HTTP API (MCP tools, the chat messages route): `call`, `get_agent_state`, `agent_exists`
and `run_in_agent` of an `AgentOperation` (`cluster.operations`: a registered name and JSON
arguments, never code) of an agent served here run here; of an agent another member serves,
they are sent to that member, which runs them as a turn of the agent, as a local call would. While the partition moves (no owner, or the owner answers that it no longer
serves it) the request waits and tries again, up to `timeout_s`. A request that timed out
is not sent again (the owner may have run it): the caller gets the timeout.

Group-wide views (MCP `agents_list`, `devices_list`, `device_last_seen`) ask every live
member a `MemberQuery` (`cluster.operations`: a registered name and JSON arguments) on the
same subject (`ask_members`): each answers for the agents it serves and the connections open
on it; a member that does not answer within `ASK_TIMEOUT_S` is reported missing, not fatal.

Must never import the daemon's assembly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors

from gatewayd.cluster.naming import partition_of
from gatewayd.cluster.operations import (
    AgentOperation,
    AgentUnavailableError,
    GroupAnswer,
    MemberQuery,
    operation_from,
    query_from,
    stored_here,
)
from gatewayd.cluster.routing import ROUTED, Router

logger = logging.getLogger(__name__)

RETRY_EVERY_S = 0.1
ASK_TIMEOUT_S = 2.0  # a member that has not answered a group-wide question by then is missing

__all__ = [
    "AgentUnavailableError",
    "ForwardedCallError",
    "RoutedRuntime",
    "RpcServer",
    "rpc_subject",
]


class ForwardedCallError(RuntimeError):
    """The call failed on the member that serves the agent; `remote_type` names the
    exception raised there."""

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.detail = message


def rpc_subject(group: str, member: str) -> str:
    return f"gw.{group}.rpc.{member}"


class RpcServer:
    """Answers forwarded calls addressed to this member (each one a task of its own)."""

    def __init__(self, router: Router, runtime: Any) -> None:
        self._router = router
        self._runtime = runtime
        self._sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        member = self._router.member
        self._sub = await member.nc.subscribe(
            rpc_subject(member.settings.group, member.name), cb=self._on_request
        )

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as err:  # the connection is already closed
                logger.debug("cluster: rpc unsubscribe: %s", err)
            self._sub = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    async def _on_request(self, msg: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        try:
            request = json.loads(msg.data)
            if isinstance(request, dict) and request.get("op") == "ask":
                query = query_from(str(request.get("name")), request.get("args"))
                await self._answer_query(msg, query)
                return
            agent_class, agent_id = str(request["class"]), str(request["id"])
            op = request.get("op")
        except (ValueError, KeyError, TypeError) as err:
            await _reply(msg, {"ok": False, "type": "BadRequest", "error": str(err)})
            return
        decision = self._router.decide(agent_id)
        if decision.kind != "local":
            await _reply(msg, {"ok": False, "moved": True, "error": decision.reason or "moved"})
            return
        try:
            if op == "call":
                result = await self._runtime.call(
                    agent_class,
                    agent_id,
                    str(request["method"]),
                    *request.get("args", []),
                    **request.get("kwargs", {}),
                )
            elif op == "state":
                result = await self._runtime.get_agent_state(agent_class, agent_id)
            elif op == "exists":
                result = stored_here(self._runtime, agent_class, agent_id)
            elif op == "run":
                operation = operation_from(str(request.get("name")), request.get("args"))
                result = await self._runtime.run_in_agent(agent_class, agent_id, operation)
            else:
                raise ValueError(f"unknown forwarded operation {op!r}")
        except Exception as err:
            await _reply(msg, {"ok": False, "type": type(err).__name__, "error": str(err)})
            return
        await _reply(msg, {"ok": True, "result": result})

    async def _answer_query(self, msg: Any, query: MemberQuery) -> None:
        """A question about this member itself: answered whichever agents it serves."""
        try:
            result = await query.answer(self._runtime, serving_now(self._router))
        except Exception as err:
            await _reply(msg, {"ok": False, "type": type(err).__name__, "error": str(err)})
            return
        await _reply(msg, {"ok": True, "result": result})


def serving_now(router: Router) -> Callable[[str], bool]:
    """Whether this member serves an agent, as of now (the partitions it serves, copied: the
    answer may be asked off the event loop, e.g. while listing files in a thread)."""
    member = router.member
    served = frozenset(n for n, held in member.partitions.items() if held.state == "serving")
    partitions = member.settings.partitions
    return lambda agent_id: partition_of(agent_id, partitions) in served


async def _reply(msg: Any, answer: dict[str, Any]) -> None:
    data = json.dumps(answer, default=str).encode()
    limit = int(getattr(getattr(msg, "_client", None), "max_payload", 0) or 0)
    if limit and len(data) > limit:  # NATS would refuse it: the caller would only time out
        data = json.dumps(
            {
                "ok": False,
                "type": "AnswerTooLarge",
                "error": f"the answer is {len(data)} bytes, over the NATS servers' max_payload "
                f"({limit}): ask for less",
            }
        ).encode()
    try:
        await msg.respond(data)
    except Exception as err:  # the caller gave up, or the connection closed
        logger.debug("cluster: rpc reply failed: %s", err)


class RoutedRuntime:
    """The agent runtime, with `call`, `get_agent_state`, `agent_exists` and `run_in_agent`
    of an `AgentOperation` routed to the agent's owner. Everything else is the runtime's own
    (`run_in_agent` of a plain function runs here: code never travels)."""

    def __init__(self, runtime: Any, router: Router, timeout_s: float = 30.0) -> None:
        self._runtime = runtime
        self._router = router
        self.timeout_s = timeout_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    async def call(
        self, agent_class: str, agent_id: str, method: str, *args: Any, **kwargs: Any
    ) -> Any:
        request = {
            "op": "call",
            "class": agent_class,
            "id": agent_id,
            "method": method,
            "args": list(args),
            "kwargs": kwargs,
        }
        return await self._routed(
            request, lambda: self._runtime.call(agent_class, agent_id, method, *args, **kwargs)
        )

    async def get_agent_state(self, agent_class: str, agent_id: str) -> Any:
        request = {"op": "state", "class": agent_class, "id": agent_id}
        return await self._routed(
            request, lambda: self._runtime.get_agent_state(agent_class, agent_id)
        )

    async def agent_exists(self, agent_class: str, agent_id: str) -> bool:
        """Whether the agent has stored state where it is served (never creates it)."""
        request = {"op": "exists", "class": agent_class, "id": agent_id}

        async def here() -> bool:
            return stored_here(self._runtime, agent_class, agent_id)

        return bool(await _bad_id_as_here(self._routed(request, here)))

    async def run_in_agent(self, agent_class: str, agent_id: str, fn: Any) -> Any:
        """`fn(agent)` as a turn of the agent: on its owner when `fn` is an `AgentOperation`,
        here when it is a plain function."""
        if not isinstance(fn, AgentOperation):
            return await self._runtime.run_in_agent(agent_class, agent_id, fn)
        request = {
            "op": "run",
            "class": agent_class,
            "id": agent_id,
            "name": fn.name,
            "args": fn.args(),
        }
        return await _bad_id_as_here(
            self._routed(request, lambda: self._runtime.run_in_agent(agent_class, agent_id, fn))
        )

    async def ask_members(
        self, query: MemberQuery, timeout_s: float = ASK_TIMEOUT_S
    ) -> GroupAnswer:
        """`query` answered by every live member (this one directly, the others over their
        rpc subject, all at once); a member that does not answer within `timeout_s`, or
        fails, is named in `missing` with why."""
        member = self._router.member
        me = member.name
        payload = json.dumps({"op": "ask", "name": query.name, "args": query.args()}).encode()

        async def ask(name: str) -> Any:
            if name == me:
                return await query.answer(self._runtime, serving_now(self._router))
            subject = rpc_subject(member.settings.group, name)
            reply = await member.nc.request(subject, payload, timeout=timeout_s)
            answer = json.loads(reply.data)
            if not answer.get("ok"):
                raise ForwardedCallError(
                    str(answer.get("type", "Error")), str(answer.get("error", ""))
                )
            return answer.get("result")

        names = list(member.ownership.alive())
        if me not in names:
            names.append(me)
        results = await asyncio.gather(*(ask(name) for name in names), return_exceptions=True)
        answers: dict[str | None, Any] = {}
        missing: dict[str, str] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, nats.errors.TimeoutError | asyncio.TimeoutError):
                missing[name] = f"no answer within {timeout_s:g}s"
            elif isinstance(result, nats.errors.NoRespondersError):
                missing[name] = "does not answer (no responder)"
            elif isinstance(result, BaseException):
                missing[name] = f"{type(result).__name__}: {result}"
            else:
                answers[name] = result
        return GroupAnswer(answers, missing)

    async def _routed(self, request: dict[str, Any], here: Any) -> Any:
        member = self._router.member
        deadline = time.monotonic() + self.timeout_s
        payload = json.dumps(request).encode()
        why = ""
        while True:
            decision = self._router.decide(str(request["id"]))
            if decision.kind == "local":
                return await here()
            left = deadline - time.monotonic()
            if decision.kind == "forward":
                subject = rpc_subject(member.settings.group, decision.member)
                ROUTED.labels("rpc").inc()
                try:
                    reply = await member.nc.request(subject, payload, timeout=max(0.1, left))
                except nats.errors.NoRespondersError:
                    why = f"{decision.member} does not answer"
                else:
                    answer = json.loads(reply.data)
                    if answer.get("ok"):
                        return answer.get("result")
                    if not answer.get("moved"):
                        raise ForwardedCallError(
                            str(answer.get("type", "Error")), str(answer.get("error", ""))
                        )
                    why = str(answer.get("error", "moved"))
            else:
                why = decision.reason
            if time.monotonic() + RETRY_EVERY_S > deadline:
                raise AgentUnavailableError(
                    str(request["class"]), str(request["id"]), self.timeout_s, why
                )
            await asyncio.sleep(RETRY_EVERY_S)


async def _bad_id_as_here(routed: Awaitable[Any]) -> Any:
    """A `ValueError` on the owner (a malformed agent id) raised as it would be here."""
    try:
        return await routed
    except ForwardedCallError as err:
        if err.remote_type == "ValueError":
            raise ValueError(err.detail) from None
        raise
