"""The dashboard feature: the page at `[dashboard] path` and the JSON it reads.

    GET  {path}/                  the page (static; it asks for the token and keeps it in
                                  sessionStorage), its files under {path}/static/
    GET  {path}/api/session       who the token is, and where the WebSocket listener is
    GET  {path}/api/overview      the sampled metrics (`?since=T`: only samples after T)
    GET  {path}/api/agents        agents by class (`?q=` part of the id, `?class=`)
    GET  {path}/api/agent         one agent (`?class=&id=`): state, schedules, queue, errors...
    POST {path}/api/replay        put a dead letter back in the queue ({"class","id","item"})
    GET  {path}/api/devices       MQTT and TCP devices, allow-list status
    GET  {path}/api/logs          the last warnings and errors

Every `/api/` route needs a bearer token with the "dashboard" scope (and, for one agent, its
class); replay needs a token that is not read-only. Everything the page loads comes from the
daemon: it works with no network beyond the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gatewayd import __version__
from gatewayd.api.errors import ApiError, agent_unavailable_response
from gatewayd.api.features import FeatureRoutes
from gatewayd.api.tokens import ApiToken, require_token
from gatewayd.cluster.operations import AgentUnavailableError
from gatewayd.config import DashboardSection
from gatewayd.dashboard.inventory import Inventory
from gatewayd.dashboard.sampler import Sampler
from gatewayd.logring import LogRing

SCOPE = "dashboard"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Nothing the page loads may come from elsewhere: it runs offline, at the edge.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def static_files() -> dict[str, bytes]:
    """The page's files by name (read once: they are part of the installed package)."""
    files = {}
    static = resources.files("gatewayd.dashboard") / "static"
    for entry in static.iterdir():
        if entry.is_file() and any(entry.name.endswith(ext) for ext in CONTENT_TYPES):
            files[entry.name] = entry.read_bytes()
    web = resources.files("gatewayd.client") / "web"
    files["gatewayd.js"] = (web / "gatewayd.js").read_bytes()
    return files


def file_response(name: str, body: bytes) -> Response:
    suffix = name[name.rfind(".") :]
    return Response(
        body,
        media_type=CONTENT_TYPES[suffix],
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


class Dashboard:
    def __init__(self, components: Any) -> None:
        # Without a running gateway (an app built for tests or tools) the page is served and
        # every /api/ route answers 503.
        config = getattr(components, "config", None)
        section = config.dashboard if config is not None else DashboardSection()
        self.components = components
        self.path = section.path.rstrip("/")
        self.files = static_files()
        self.sampler = Sampler(
            components, interval_s=section.sample_interval, history_s=section.history
        )
        self.inventory = Inventory(components)
        self.logs = LogRing(500, logging.WARNING)  # the last warnings and errors

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        logging.getLogger().addHandler(self.logs)
        await self.sampler.start()
        try:
            yield
        finally:
            await self.sampler.stop()
            logging.getLogger().removeHandler(self.logs)

    def routes(self) -> list[BaseRoute]:
        p = self.path
        return [
            Route(p, self.redirect, methods=["GET"]),
            Route(p + "/", self.page, methods=["GET"]),
            Route(p + "/static/{name}", self.static, methods=["GET"]),
            Route(p + "/api/session", self.session, methods=["GET"]),
            Route(p + "/api/overview", self.overview, methods=["GET"]),
            Route(p + "/api/agents", self.agents, methods=["GET"]),
            Route(p + "/api/agent", self.agent, methods=["GET"]),
            Route(p + "/api/replay", self.replay, methods=["POST"]),
            Route(p + "/api/devices", self.devices, methods=["GET"]),
            Route(p + "/api/logs", self.recent_logs, methods=["GET"]),
        ]

    # -- the page ----------------------------------------------------------------------------

    async def redirect(self, request: Request) -> Response:
        return RedirectResponse(self.path + "/")

    async def page(self, request: Request) -> Response:
        return file_response("index.html", self.files["index.html"])

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self.files.get(name)
        if body is None:
            raise ApiError(404, f"no dashboard file {name!r}", code="not_found")
        return file_response(name, body)

    # -- the data ----------------------------------------------------------------------------

    def _authorize(
        self, request: Request, *, agent_class: str | None = None, write: bool = False
    ) -> ApiToken:
        token = require_token(request, SCOPE, agent_class=agent_class, write=write)
        if getattr(self.components, "runtime", None) is None:
            raise ApiError(503, "no gateway is running in this process", code="no_gateway")
        return token

    async def session(self, request: Request) -> JSONResponse:
        token = self._authorize(request)
        ws = self.components.config.listeners.websocket
        host, port = ws.bind
        return JSONResponse(
            {
                "token": token.name,
                "read_only": token.read_only,
                "classes": sorted(token.classes),
                "version": __version__,
                "ws": {
                    "enabled": ws.enabled,
                    # A wildcard bind is reached at whatever host the page came from.
                    "host": None if host in ("0.0.0.0", "::", "") else host,
                    "port": self._ws_port(port),
                },
                "sample_interval_s": self.sampler.interval_s,
            }
        )

    def _ws_port(self, configured: int) -> int:
        listener = self.components.transports.get("ws")
        return int(getattr(listener, "bound_port", configured)) if listener else configured

    async def overview(self, request: Request) -> JSONResponse:
        self._authorize(request)
        since = _float(request.query_params.get("since"), "since")
        listing = await self.inventory.agents()
        latest = self.sampler.latest or {}
        return JSONResponse(
            {
                "now": time.time(),
                "latest": latest,
                "samples": self.sampler.samples(since),
                "agents": {
                    "known": listing["total"],
                    "awake": listing["awake"],
                    "hibernated": listing["hibernated"],
                },
                "models": sorted(self.components.engine.model_names())
                if self.components.engine is not None
                else [],
                "generators": sorted(self.components.generators or {}),
            }
        )

    async def agents(self, request: Request) -> JSONResponse:
        token = self._authorize(request)
        agent_class = request.query_params.get("class") or None
        listing = await self.inventory.agents(request.query_params.get("q", ""), agent_class)
        listing["agents"] = [a for a in listing["agents"] if token.allows_class(a["class"])]
        listing["classes"] = [c for c in listing["classes"] if token.allows_class(c)]
        return JSONResponse(listing)

    async def agent(self, request: Request) -> JSONResponse:
        self._authorize(request)
        try:
            agent_class, agent_id = await self._agent_params(dict(request.query_params))
            self._authorize(request, agent_class=agent_class)
            return JSONResponse(await self.inventory.agent(agent_class, agent_id, self.logs))
        except AgentUnavailableError as err:  # cluster mode: no member serves it right now
            return agent_unavailable_response(err)

    async def replay(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, 'the body must be JSON: {"class", "id", "item"}') from None
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object: {"class", "id", "item"}')
        self._authorize(request)
        item = body.get("item")
        try:
            agent_class, agent_id = await self._agent_params(body)
            self._authorize(request, agent_class=agent_class, write=True)
            if not isinstance(item, str) or not item:
                raise ApiError(400, "item: the dead letter's id (a string) is required")
            replayed = await self.inventory.replay(agent_class, agent_id, item)
        except AgentUnavailableError as err:  # cluster mode: no member serves it right now
            return agent_unavailable_response(err)
        if not replayed:
            raise ApiError(
                404, f"agent {agent_class}/{agent_id} has no dead letter {item!r}", code="not_found"
            )
        return JSONResponse({"replayed": item})

    async def devices(self, request: Request) -> JSONResponse:
        token = self._authorize(request)
        listing = await self.inventory.devices()
        listing["devices"] = [d for d in listing["devices"] if token.allows_class(d["class"])]
        return JSONResponse(listing)

    async def recent_logs(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"entries": [e.to_json() for e in self.logs.entries()[-100:][::-1]]})

    async def _agent_params(self, params: dict[str, Any]) -> tuple[str, str]:
        agent_class, agent_id = params.get("class"), params.get("id")
        if not isinstance(agent_class, str) or not isinstance(agent_id, str) or not agent_id:
            raise ApiError(400, "class and id are required (the agent's class and id)")
        if agent_class not in self.components.runtime.classes:
            raise ApiError(404, f"no agent class {agent_class!r}", code="not_found")
        if not await self.inventory.exists(agent_class, agent_id):
            raise ApiError(404, f"no agent {agent_class}/{agent_id}", code="not_found")
        return agent_class, agent_id


def _float(value: str | None, name: str) -> float:
    if value is None or value == "":
        return 0.0
    try:
        return float(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a number (epoch seconds), got {value!r}") from None


def routes(components: Any) -> FeatureRoutes:
    config = getattr(components, "config", None)
    if config is None or not config.dashboard.enabled:
        return FeatureRoutes([])  # off, or an app built without a gateway (tests, tools)
    dashboard = Dashboard(components)
    return FeatureRoutes(
        dashboard.routes(), lifespan=dashboard.lifespan(), summary=dashboard.path + "/"
    )
