"""The operator's HTTP endpoint: Prometheus `/metrics`, `/healthz` (alive) and `/readyz`.

Served by the standard library's WSGI server on its own thread, so metrics and health answers
keep flowing even while the event loop is busy — and `/healthz` can then tell that the loop is
stuck (its last health snapshot is stale), which is exactly when an operator needs to know.

The HTTP thread never calls into loop-owned objects (iterating a dict the loop is changing can
raise or see a torn state): the loop computes health and *publishes* an immutable
`HealthSnapshot` (`publish()`, e.g. every heartbeat); the HTTP thread only reads the latest one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """Health as the event loop saw it at `taken_at` (`time.monotonic()`)."""

    live: bool
    live_reason: str
    ready: bool
    ready_reason: str
    taken_at: float


STARTING = HealthSnapshot(False, "starting", False, "starting", 0.0)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class HttpEndpoint:
    """Starts on `start()`, serves until `stop()`; `port` is the bound port (for port 0)."""

    def __init__(self, host: str, port: int, *, stall_limit_s: float) -> None:
        self._metrics_app = make_wsgi_app()
        self._stall_limit_s = stall_limit_s
        self._snapshot = STARTING
        self._server = make_server(
            host, port, self._app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def publish(self, snapshot: HealthSnapshot) -> None:
        """Called on the event loop; one reference assignment, atomic for the HTTP thread."""
        self._snapshot = snapshot

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            ok, reason = self._answer(path)
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{'ok' if ok else 'not ok'}: {reason}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    def _answer(self, path: str) -> tuple[bool, str]:
        snapshot = self._snapshot  # read once: the loop may publish a new one meanwhile
        if snapshot is STARTING:
            return False, "starting"
        age_s = time.monotonic() - snapshot.taken_at
        if age_s > self._stall_limit_s:
            return False, f"event loop stalled: no health report for {age_s:.1f}s"
        if path == "/healthz":
            return snapshot.live, snapshot.live_reason
        return snapshot.ready, snapshot.ready_reason
