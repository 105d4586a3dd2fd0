"""`ApiError` and the one JSON error shape every API route answers with (OpenAI's)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class ApiError(Exception):
    """Raise from a route to answer `status` with `{"error": {"message", "type", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code


def error_response(
    status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": type, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def agent_unavailable_response(err: Any, retry_after_s: int = 2) -> JSONResponse:
    """503 with Retry-After for an `AgentUnavailableError` (cluster mode: no member served
    the agent within the call's timeout; its partition is moving, or its owner is gone)."""
    message = (
        f"agent {err.agent_class}/{err.agent_id} is unavailable: {err.reason} "
        f"(no member of the group served it in time); retry in {retry_after_s}s"
    )
    response = error_response(503, message, type="server_error", code="agent_unavailable")
    response.headers["Retry-After"] = str(retry_after_s)
    return response


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, type=exc.type, code=exc.code)
