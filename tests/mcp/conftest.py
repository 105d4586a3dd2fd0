"""An agent runtime behind the real API server (uvicorn on a free port) with the MCP feature,
and the SDK's own Streamable HTTP client with a bearer token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from gatewayd.agents import AgentRuntime, AgentSettings
from gatewayd.api import ApiServer, ApiToken, Tokens, build_app
from gatewayd.config import parse_config
from tests.mcp.lamps import Lamp, Meter

OPERATOR = ApiToken("operator", "operator-secret-0123456789")
READER = ApiToken("reader", "reader-secret-0123456789", read_only=True)
LAMPS_ONLY = ApiToken("lamps-only", "lamps-only-secret-0123456789",
                      classes=frozenset({"lamp"}))  # fmt: skip
NO_MCP = ApiToken("openai-only", "openai-only-secret-0123456789",
                  scopes=frozenset({"openai"}))  # fmt: skip
TOKENS = (OPERATOR, READER, LAMPS_ONLY, NO_MCP)


@dataclass
class Components:
    config: Any
    runtime: Any
    engine: Any = None
    generators: dict[str, Any] = field(default_factory=dict)


@dataclass
class Gateway:
    url: str
    runtime: AgentRuntime
    server: ApiServer


@contextlib.asynccontextmanager
async def serving(
    state_dir: Path,
    mcp: dict[str, Any] | None = None,
    engine: Any = None,
    classes: dict[str, type] | None = None,
) -> AsyncIterator[Gateway]:
    classes = classes or {"lamp": Lamp, "meter": Meter}
    config = parse_config(
        {
            "gateway": {"state_dir": str(state_dir)},
            "agents": {
                "classes": {
                    name: {"class": f"{cls.__module__}:{cls.__qualname__}"}
                    for name, cls in classes.items()
                }
            },
            "mcp": mcp or {"classes": {"meter": ["add"]}},
        }
    )
    runtime = AgentRuntime(AgentSettings(state_dir=state_dir), classes, engine=engine)
    await runtime.start()
    app, features = build_app(Components(config, runtime, engine), Tokens.of(*TOKENS))
    server = ApiServer(
        app, "127.0.0.1", 0, lifespans=[f.lifespan for f in features.values() if f.lifespan]
    )
    await server.start()
    try:
        yield Gateway(f"http://127.0.0.1:{server.port}/mcp", runtime, server)
    finally:
        await server.stop(2)
        await runtime.close()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with serving(tmp_path / "state") as running:
        yield running


@contextlib.asynccontextmanager
async def mcp_client(url: str, token: ApiToken | None, **options: Any) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token.secret}"} if token is not None else None
    async with (
        create_mcp_http_client(headers=headers) as http,
        Client(streamable_http_client(url, http_client=http), **options) as client,
    ):
        yield client
