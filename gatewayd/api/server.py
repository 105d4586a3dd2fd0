"""`build_app` assembles the API's Starlette app; `ApiServer` serves it with uvicorn on the
running event loop (no thread, no second loop: routes call the agent runtime directly).

uvicorn's own signal handling is switched off: the daemon owns SIGTERM/SIGINT/SIGHUP and
stops the server as one step of its drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gatewayd.api.errors import ApiError, error_response, handle_api_error
from gatewayd.api.features import FEATURES, Feature, FeatureRoutes, load_features
from gatewayd.api.tokens import Tokens

log = logging.getLogger(__name__)
# uvicorn's start/stop chatter duplicates the daemon's own lines; its warnings still show.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(
        404, f"no such endpoint: {request.method} {request.url.path}", code="not_found"
    )


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(
        405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("api: %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "internal error (logged by the gateway)", type="server_error", code="internal_error"
    )


def build_app(
    components: Any, tokens: Tokens, features: Sequence[Feature] = FEATURES
) -> tuple[Starlette, dict[str, FeatureRoutes]]:
    """The app and the features it serves (by name)."""
    loaded = load_features(components, features)
    routes: list[BaseRoute] = [route for made in loaded.values() for route in made.routes]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: handle_api_error,
            404: _not_found,
            405: _method_not_allowed,
            500: _internal_error,
        },
    )
    app.state.components = components
    app.state.tokens = tokens
    app.state.features = tuple(loaded)
    return app, loaded


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the daemon handles signals
        yield


class ApiServer:
    """Serves `app` on host:port (port 0 picks a free one: see `port`) until `stop()`."""

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        *,
        lifespans: Sequence[contextlib.AbstractAsyncContextManager[Any]] = (),
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._lifespans = list(lifespans)
        self._stack = AsyncExitStack()
        self._socket: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._socket is not None, "not started"
        return int(self._socket.getsockname()[1])

    async def start(self) -> None:
        """Bind (OSError if the port is taken), enter the features' lifespans, serve."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        for lifespan in self._lifespans:
            await self._stack.enter_async_context(lifespan)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            ws="none",
            timeout_graceful_shutdown=5,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api-server")
        while not self._server.started:  # startup() is quick: it only wraps the bound socket
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.005)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let open requests (e.g. SSE streams) finish up to `timeout_s`,
        then close what is left and leave the features' lifespans."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            done, _ = await asyncio.wait({self._task}, timeout=max(timeout_s, 0.1))
            if not done:
                self._server.force_exit = True
                await asyncio.wait({self._task}, timeout=2.0)
                if not self._task.done():
                    self._task.cancel()
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        if self._socket is not None:
            self._socket.close()
