"""Who is calling: the API token of the current MCP request, and the checks made with it.

The server sets the caller (a `gatewayd.api.tokens.ApiToken`) around each tool call and
resource read; tools that list things read it back with `caller()` to show only the agent
classes the token may reach.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from gatewayd.api.tokens import ApiToken
from gatewayd.tools import ToolError

_CALLER: contextvars.ContextVar[ApiToken | None] = contextvars.ContextVar(
    "gatewayd_mcp_caller", default=None
)

# Every class, every scope, may write: what the stdio verb's upstream check already ensured,
# and what in-process callers (tests, embedding) get when no token is set.
TRUSTED = ApiToken("in-process")


class AccessDenied(ToolError):
    """The caller's token may not do this; the message names the token and what was refused."""


def caller() -> ApiToken:
    return _CALLER.get() or TRUSTED


@contextmanager
def calling_as(token: ApiToken) -> Iterator[None]:
    reset = _CALLER.set(token)
    try:
        yield
    finally:
        _CALLER.reset(reset)


def check_class(token: ApiToken, agent_class: str) -> None:
    if not token.allows_class(agent_class):
        raise AccessDenied(f"token {token.name!r} may not reach agent class {agent_class!r}")


def check_write(token: ApiToken, what: str) -> None:
    if token.read_only:
        raise AccessDenied(
            f"token {token.name!r} is read-only: it cannot call {what}, which changes things"
        )
