"""`gatewayd mcp -c CONFIG` over stdio, launched by the SDK's own stdio client the way a
desktop client launches it, in front of a real `gatewayd run` daemon: tools listed and called
(the daemon's agent changes), a resource read and subscribed to, and the daemon's refusal of
a read-only token passed through."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp import Client, StdioServerParameters

from gatewayd import cli
from gatewayd.api import ApiToken
from gatewayd.config import ConfigError, load_config
from gatewayd.mcp.stdio_proxy import daemon_url
from gatewayd.wiring import check_references
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.notify import NotifySocket
from tests.mcp.conftest import mcp_client
from tests.mcp.remote import free_port

OPS = "ops-secret-0123456789"
VIEWER = "viewer-secret-0123456789"
OPS_TOKEN = ApiToken("ops", OPS)


def write_config(tmp_path: Path, port: int, classes: str = '{ meter = ["add"] }') -> Path:
    (tmp_path / "tokens.toml").write_text(
        f"[tokens.ops]\ntoken = '{OPS}'\nscopes = ['mcp']\n"
        f"[tokens.viewer]\ntoken = '{VIEWER}'\nread_only = true\n"
    )
    config = tmp_path / "gatewayd.toml"
    config.write_text(
        '[gateway]\nstate_dir = "state"\n[http]\nenabled = false\n[mqtt]\nenabled = false\n'
        "[listeners.websocket]\nenabled = false\n"
        f'[api]\nenabled = true\nbind = "127.0.0.1:{port}"\ntokens_file = "tokens.toml"\n'
        f"[mcp]\nclasses = {classes}\n"
        f'[agents]\npython_path = ["{REPO}"]\n'
        '[agents.classes.lamp]\nclass = "tests.mcp.lamps:Lamp"\n'
        '[agents.classes.meter]\nclass = "tests.mcp.lamps:Meter"\n'
    )
    return config


def stdio_params(config: Path, token_file: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "gatewayd", "mcp", "-c", str(config), "--token-file", str(token_file)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, types.TextContent))


@pytest.mark.filterwarnings("ignore:resources/.*subscribe is removed:Warning")
async def test_desktop_client_over_stdio_reaches_the_daemon(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    (tmp_path / "ops.token").write_text(OPS + "\n")
    (tmp_path / "viewer.token").write_text(VIEWER)
    daemon = GatewayProcess(config, NotifySocket(tmp_path, abstract=True))
    await asyncio.to_thread(daemon.start)
    updated: asyncio.Queue[str] = asyncio.Queue()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.put_nowait(str(message.params.uri))

    try:
        async with Client(
            stdio_params(config, tmp_path / "ops.token"), mode="legacy", message_handler=on_message
        ) as client:
            names = [tool.name for tool in (await client.list_tools()).tools]
            assert names[:2] == ["agent_classes_list", "agents_list"]
            assert {"lamp_switch", "lamp_status", "meter_add"} <= set(names)
            result = await client.call_tool("lamp_switch", {"agent_id": "hall", "on": True})
            assert result.structured_content == {"on": True, "brightness": 100}

            read = await client.read_resource("agent://lamp/hall")
            assert json.loads(read.contents[0].text) == {"on": True, "brightness": 100}
            await client.session.subscribe_resource("agent://lamp/hall")
            await client.call_tool("lamp_switch", {"agent_id": "hall", "on": False})
            assert await asyncio.wait_for(updated.get(), 15) == "agent://lamp/hall"
            read = await client.read_resource("agent://lamp/hall")
            assert json.loads(read.contents[0].text) == {"on": False, "brightness": 0}

        async with Client(stdio_params(config, tmp_path / "viewer.token")) as viewer:
            refused = await viewer.call_tool("meter_add", {"agent_id": "m1", "kwh": 1.0})
            assert refused.is_error and "token 'viewer' is read-only" in text_of(refused)
            # A 2026-protocol client listens; the change comes from an HTTP client of the
            # daemon itself.
            async with viewer.listen(resource_subscriptions=["agent://lamp/hall"]) as events:
                async with mcp_client(daemon_url(load_config(config)), OPS_TOKEN) as ops:
                    await ops.call_tool("lamp_switch", {"agent_id": "hall", "on": True})
                event = await asyncio.wait_for(anext(aiter(events)), 15)
                assert event.uri == "agent://lamp/hall"
    finally:
        assert await asyncio.to_thread(daemon.stop) == 0
    log = daemon.log_text()
    assert (
        "mcp: ops called lamp_switch: ok" in log and "mcp: viewer called meter_add: refused" in log
    )


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """The verb routes logging to stderr (setup_logging); give the test run its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("keep_logging")
def test_without_a_token_or_daemon_the_verb_says_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, free_port())
    monkeypatch.delenv("GATEWAYD_MCP_TOKEN", raising=False)
    assert cli.main(["mcp", "-c", str(config)]) == 2
    assert "pass --token-file FILE or set GATEWAYD_MCP_TOKEN" in capsys.readouterr().err

    monkeypatch.setenv("GATEWAYD_MCP_TOKEN", OPS)  # no daemon listens there
    assert cli.main(["mcp", "-c", str(config)]) == 1
    assert "gatewayd mcp: cannot serve through http://127.0.0.1:" in capsys.readouterr().err

    (tmp_path / "missing.toml").write_text("[mcp]\ntool_groups = ['everything']\n")
    assert cli.main(["mcp", "-c", str(tmp_path / "missing.toml")]) == 78
    assert "mcp.tool_groups.0: Input should be 'agents'" in capsys.readouterr().err


def test_check_config_names_an_mcp_class_method_that_is_not_callable(tmp_path: Path) -> None:
    config = write_config(tmp_path, 0, classes='{ lamp = ["switch", "replace_bulb"] }')
    with pytest.raises(ConfigError) as err:
        check_references(load_config(config), config)
    assert (
        "mcp: classes.lamp: replace_bulb is not a @callable method of tests.mcp.lamps.Lamp"
        in str(err.value)
    )
