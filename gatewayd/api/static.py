"""`GET /client/gatewayd.js` and `/client/gatewayd.d.ts`: the browser client, served by the
daemon so a page at the edge imports it with no build step and no outside fetch:

    import { AgentClient } from "http://GATEWAY:8780/client/gatewayd.js";

Public code, no token needed (the agents' WebSocket listener is where access is decided).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

FILES = {
    "gatewayd.js": "text/javascript; charset=utf-8",
    "gatewayd.d.ts": "text/plain; charset=utf-8",
}


def routes(components: Any) -> list[BaseRoute]:
    if components is None:
        return []  # an app built without a gateway (tests, tools): no agents to talk to
    web = resources.files("gatewayd.client") / "web"
    bodies = {name: (web / name).read_bytes() for name in FILES}

    def serve(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return Response(
                bodies[name],
                media_type=FILES[name],
                headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-cache"},
            )

        return endpoint

    return [Route(f"/client/{name}", serve(name), methods=["GET"]) for name in FILES]
