"""`GET /api`: which features this gateway serves, and which token the caller used."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from gatewayd import __version__


async def _index(request: Request) -> JSONResponse:
    token = request.app.state.tokens.authenticate(request.headers.get("authorization"))
    return JSONResponse(
        {
            "gateway": "gatewayd",
            "version": __version__,
            "features": sorted(request.app.state.features),
            "token": {
                "name": token.name,
                "scopes": sorted(token.scopes),
                "classes": sorted(token.classes),
                "read_only": token.read_only,
            },
        }
    )


def routes(components: Any) -> list[BaseRoute]:
    return [Route("/api", _index, methods=["GET"])]
