"""`GET /agents/{class}/{id}/messages`: a chat agent's stored conversation over the HTTP API.

    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/agents/chat/kitchen/messages
    -> {"messages": [{"id", "role", "parts", "metadata"?}, ...]}       (oldest first)

`?limit=N` returns the newest N (still oldest first). The token needs the `messages` scope and
the class (gatewayd.api.tokens). The read is a normal turn of the agent (it wakes it if it
hibernates; in a group of gateways it runs on the agent's owner, and answers 503 with
Retry-After when no member serves the agent in time); messages are as stored (large parts compacted, see guard.py). An API feature
(gatewayd/api/features.py).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from gatewayd.api.errors import ApiError, agent_unavailable_response
from gatewayd.api.tokens import require_token
from gatewayd.chat.agent import ChatAgent
from gatewayd.cluster.operations import AgentUnavailableError, ChatMessages


async def _messages(request: Request) -> JSONResponse:
    agent_class = request.path_params["agent_class"]
    agent_id = request.path_params["agent_id"]
    require_token(request, "messages", agent_class=agent_class)
    components = request.app.state.components
    # In cluster mode the runtime with calls routed to the agent's owner.
    runtime = getattr(components, "routed_runtime", None) or components.runtime
    cls = runtime.classes.get(agent_class)
    if cls is None:
        raise ApiError(404, f"no agent class named {agent_class!r}", code="unknown_class")
    if not issubclass(cls, ChatAgent):
        raise ApiError(
            404, f"agent class {agent_class!r} is not a chat agent", code="not_a_chat_agent"
        )
    limit = _limit(request.query_params.get("limit"))
    try:
        messages = await runtime.run_in_agent(agent_class, agent_id, ChatMessages())
    except ValueError as err:  # a malformed agent id
        raise ApiError(400, str(err), code="bad_agent_id") from None
    except AgentUnavailableError as err:  # cluster mode: no member serves it right now
        return agent_unavailable_response(err)
    if limit is not None:
        messages = messages[-limit:] if limit else []
    return JSONResponse({"messages": messages})


def _limit(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise ApiError(
            400, f"limit: a whole number >= 0 is required, got {raw!r}", code="bad_limit"
        )
    return int(raw)


def routes(components: Any) -> list[BaseRoute]:
    if components is None:  # an API without a daemon behind it (tests): no agents to read
        return []
    return [Route("/agents/{agent_class}/{agent_id}/messages", _messages, methods=["GET"])]
