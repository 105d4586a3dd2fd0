"""README "MCP": the client configurations name a real verb, path and token, and the Python
example runs as printed against a gateway serving the example config's [mcp] section."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tomllib
from pathlib import Path

from gatewayd.cli import build_parser
from gatewayd.config import McpSection
from gatewayd.examples.thermostat import Thermostat
from tests.mcp.conftest import OPERATOR, serving

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## MCP\n") : README.index("## Observability\n")]
EXAMPLE_TOKEN = "gw-example-token-change-me"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SECTION, re.S)


def test_the_client_configurations_name_the_real_verb_path_and_token() -> None:
    stdio, http = (json.loads(block)["mcpServers"]["gatewayd"] for block in blocks("json"))
    assert stdio["command"].endswith("/gatewayd")
    args = build_parser().parse_args(stdio["args"])
    assert args.command == "mcp" and args.token_file is not None
    assert http["url"].endswith(McpSection().path) and http["type"] == "http"
    tokens = tomllib.loads((REPO / "api-tokens.example.toml").read_text())["tokens"]
    assert http["headers"]["Authorization"] == f"Bearer {tokens['example']['token']}"
    assert tokens["example"]["token"] == EXAMPLE_TOKEN


async def test_the_python_example_calls_the_tool_as_printed(tmp_path: Path) -> None:
    example = tomllib.loads((REPO / "config.example.toml").read_text())["mcp"]
    (code,) = blocks("python")
    async with serving(tmp_path / "state", example, classes={"thermostat": Thermostat}) as gw:
        code = code.replace("http://127.0.0.1:8780/mcp", gw.url)
        code = code.replace(EXAMPLE_TOKEN, OPERATOR.secret)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        assert process.returncode == 0
        printed = re.search(r"print\(result.structured_content\)  # (.*)", code)
        assert printed is not None and out.decode().strip() == printed.group(1)
        state = await gw.runtime.get_agent_state("thermostat", "living-room")
        assert state["target"] == 22.0
