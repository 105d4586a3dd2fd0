"""The daemon's HTTP API: one Starlette app served by uvicorn on the daemon's own event loop.

Features (the OpenAI-compatible endpoint, MCP, chat history, the dashboard ...) contribute
routes through `features.FEATURES`; every request is authenticated with a bearer token from
the tokens file (`tokens.py`), scoped to features and agent classes. Errors use one JSON shape,
OpenAI's: `{"error": {"message", "type", "code"}}`.

This package never imports `gatewayd.daemon` (the daemon starts it through `wiring`).
"""

from gatewayd.api.errors import ApiError
from gatewayd.api.server import ApiServer, build_app
from gatewayd.api.tokens import ApiToken, TokenFileError, Tokens, require_token

__all__ = [
    "ApiError",
    "ApiServer",
    "ApiToken",
    "TokenFileError",
    "Tokens",
    "build_app",
    "require_token",
]
