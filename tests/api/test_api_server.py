"""The API server over real HTTP: tokens, scopes, the one error shape, a feature whose
lifespan brackets the server, and the daemon serving it from its config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gatewayd.api import ApiServer, ApiToken, TokenFileError, Tokens, build_app, require_token
from gatewayd.api.features import FEATURES, Feature, FeatureRoutes

OPERATOR = ApiToken("operator", "operator-secret-0123456789")
READER = ApiToken("reader", "reader-secret-0123456789", scopes=frozenset({"demo"}),
                  classes=frozenset({"thermostat"}), read_only=True)  # fmt: skip

events: list[str] = []


async def _demo(request: Request) -> JSONResponse:
    token = require_token(
        request, "demo", agent_class=request.path_params["cls"], write=request.method == "POST"
    )
    return JSONResponse({"token": token.name})


@contextlib.asynccontextmanager
async def _lifespan() -> AsyncIterator[None]:
    events.append("enter")
    yield
    events.append("exit")


def demo_routes(components: Any) -> FeatureRoutes:
    return FeatureRoutes(
        [Route("/demo/{cls}", _demo, methods=["GET", "POST"])], lifespan=_lifespan()
    )


def off_routes(components: Any) -> list[Any]:
    return []


DEMO = (*FEATURES, Feature("demo", f"{__name__}:demo_routes"), Feature("off", f"{__name__}:off_routes"),
        Feature("missing", "gatewayd_no_such_module:routes", extra="nothing"))  # fmt: skip


@contextlib.asynccontextmanager
async def serving(tokens: Tokens) -> AsyncIterator[httpx.AsyncClient]:
    app, features = build_app(None, tokens, DEMO)
    server = ApiServer(
        app, "127.0.0.1", 0, lifespans=[f.lifespan for f in features.values() if f.lifespan]
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        await server.stop(2)


def bearer(token: ApiToken) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.secret}"}


async def test_tokens_scopes_classes_and_read_only() -> None:
    events.clear()
    async with serving(Tokens.of(OPERATOR, READER)) as client:
        assert events == ["enter"]
        index = (await client.get("/api", headers=bearer(READER))).json()
        assert index["features"] == ["demo", "index"] and index["token"]["name"] == "reader"
        assert (await client.get("/demo/thermostat", headers=bearer(READER))).json() == {
            "token": "reader"
        }
        assert (await client.post("/demo/other", headers=bearer(OPERATOR))).json() == {
            "token": "operator"
        }

        refused = await client.post("/demo/thermostat", headers=bearer(READER))
        assert refused.status_code == 403
        assert refused.json()["error"] == {"message": "token 'reader' is read-only", "type": "permission_error",
                                           "code": "read_only_token", "param": None}  # fmt: skip
        other_class = await client.get("/demo/other", headers=bearer(READER))
        assert (
            other_class.status_code == 403 and "'other'" in other_class.json()["error"]["message"]
        )

        missing = await client.get("/demo/thermostat")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "missing_token"
        wrong = await client.get("/demo/thermostat", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid token"

        unknown = await client.get("/nowhere", headers=bearer(OPERATOR))
        assert unknown.status_code == 404
        assert unknown.json()["error"]["message"] == "no such endpoint: GET /nowhere"
    assert events == ["enter", "exit"]


async def test_lifespans_with_task_groups_stop_from_another_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon starts the server in its start-up task and stops it in its shutdown task; a
    feature's anyio task group (MCP's session manager has one) must still be left cleanly."""
    import anyio

    finished: list[str] = []

    @contextlib.asynccontextmanager
    async def with_task_group() -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.sleep_forever)
            yield
            group.cancel_scope.cancel()
        finished.append("left")

    app, _ = build_app(None, Tokens.of(OPERATOR), FEATURES)
    server = ApiServer(app, "127.0.0.1", 0, lifespans=[with_task_group()])
    await asyncio.create_task(server.start())
    await asyncio.create_task(server.stop(2))
    assert finished == ["left"]
    assert "failed while stopping" not in caplog.text


async def test_a_feature_that_fails_to_start_fails_the_server_start() -> None:
    @contextlib.asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise RuntimeError("the feature cannot start")
        yield

    app, _ = build_app(None, Tokens.of(OPERATOR), FEATURES)
    server = ApiServer(app, "127.0.0.1", 0, lifespans=[broken()])
    with pytest.raises(RuntimeError, match="cannot start"):
        await server.start()
    await server.stop(1)


async def test_without_tokens_every_request_is_refused_with_how_to_fix() -> None:
    async with serving(Tokens(None)) as client:
        answer = await client.get("/api", headers={"Authorization": "Bearer anything-at-all"})
        assert answer.status_code == 401
        assert "set api.tokens_file" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[tokens.a]\ntoken = 'short'\n", "tokens.a: the secret is 5 characters"),
        ("[tokens.a]\nscopes = ['*']\n", "give exactly one of token or token_file"),
        (
            "[tokens.a]\ntoken = 'aaaaaaaaaaaaaaaaaaaa'\ncolour = 1\n",
            "tokens.a.colour: Extra inputs",
        ),
        (
            "[tokens.a]\ntoken = 'aaaaaaaaaaaaaaaaaaaa'\n[tokens.b]\ntoken = 'aaaaaaaaaaaaaaaaaaaa'\n",
            "tokens.b has the same secret as tokens.a",
        ),
        ("[tokens.a]\ntoken_file = 'absent.token'\n", "cannot read token_file"),
        ("[tokens.a\n", "not valid TOML"),
    ],
)
def test_bad_token_files_name_the_file_and_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(TokenFileError) as err:
        Tokens(path)
    assert str(err.value).startswith(str(path)) and problem in str(err.value)


def test_token_file_secrets_are_read_relative_to_the_tokens_file(tmp_path: Path) -> None:
    (tmp_path / "ops.token").write_text("ops-secret-from-a-file-1234\n")
    path = tmp_path / "tokens.toml"
    path.write_text("[tokens.ops]\ntoken_file = 'ops.token'\nscopes = ['mcp']\n")
    (ops,) = Tokens(path)._tokens
    assert ops.secret == "ops-secret-from-a-file-1234" and ops.scopes == {"mcp"}


def test_the_daemon_serves_the_api_from_its_config(tmp_path: Path) -> None:
    from tests.gatewayd.daemon_process import GatewayProcess
    from tests.gatewayd.notify import NotifySocket

    (tmp_path / "tokens.toml").write_text("[tokens.ops]\ntoken = 'ops-secret-0123456789'\n")
    config = tmp_path / "gatewayd.toml"
    config.write_text(
        '[gateway]\nstate_dir = "state"\n[http]\nenabled = false\n[mqtt]\nenabled = false\n'
        "[listeners.websocket]\nenabled = false\n"
        '[api]\nenabled = true\nbind = "127.0.0.1:0"\ntokens_file = "tokens.toml"\n'
    )
    daemon = GatewayProcess(config, NotifySocket(tmp_path, abstract=True))
    daemon.start()
    try:
        daemon.wait_log("api: serving")
        line = next(line for line in daemon.log_text().splitlines() if "api: serving" in line)
        port = int(re.search(r"port=(\d+)", line).group(1))  # type: ignore[union-attr]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api",
            headers={"Authorization": "Bearer ops-secret-0123456789"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert json.loads(answer.read())["token"]["name"] == "ops"
    finally:
        assert daemon.stop() == 0
