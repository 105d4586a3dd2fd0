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
# On stop, requests still open after this long are likely feature-owned listeners (MCP event
# streams): the features' lifespans are then left so that those end too.
LISTENER_GRACE_S = 0.5
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
        # The lifespans are entered and left by one task of their own: anyio task groups
        # inside them (MCP's session manager) must be left by the task that entered them.
        self._lifespan_task: asyncio.Task[None] | None = None
        self._release_lifespans = asyncio.Event()
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
        # IPPROTO_TCP explicitly: accepted sockets inherit it, and asyncio sets TCP_NODELAY only
        # on sockets whose proto says TCP; without it every response written in two parts
        # (headers, body; each SSE chunk) waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        if self._lifespans:
            entered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._lifespan_task = asyncio.create_task(
                self._hold_lifespans(entered), name="api-lifespans"
            )
            try:
                await entered  # raises what a feature raised while starting
            except BaseException:
                sock.close()
                raise
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
        """Stop accepting and let open requests (e.g. SSE streams) finish, up to `timeout_s`.

        Long-lived listeners owned by a feature (MCP's event streams) never end by themselves:
        if requests are still open after a moment, the features' lifespans are left first,
        which ends those, and the rest keep what is left of `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.1)
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait({self._task}, timeout=min(LISTENER_GRACE_S, timeout_s))
            if not self._task.done():
                await self._leave_lifespans()
                await asyncio.wait({self._task}, timeout=max(0.0, deadline - loop.time()))
            if not self._task.done():
                self._server.force_exit = True
                await asyncio.wait({self._task}, timeout=2.0)
                if not self._task.done():
                    self._task.cancel()
        await self._leave_lifespans()
        if self._socket is not None:
            self._socket.close()

    async def _hold_lifespans(self, entered: asyncio.Future[None]) -> None:
        try:
            async with AsyncExitStack() as stack:
                for lifespan in self._lifespans:
                    await stack.enter_async_context(lifespan)
                entered.set_result(None)
                await self._release_lifespans.wait()
        except Exception as err:
            if entered.done():
                raise
            entered.set_exception(err)  # start() raises it
        except BaseException:
            entered.cancel()
            raise

    async def _leave_lifespans(self) -> None:
        task = self._lifespan_task
        if task is None:
            return
        self._release_lifespans.set()
        try:
            await task
        except Exception:
            log.exception("api: a feature failed while stopping")
        finally:
            self._lifespan_task = None
