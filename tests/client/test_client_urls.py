"""The Python client (and `gatewayd agent --url A,B`) given several gateway URLs (a group of
gateways): it skips a gateway that cannot be reached for the next one, and fails at once only
when none can be reached."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gatewayd.client import AgentClient
from tests.brokers import free_port
from tests.client.daemon import Gateway
from tests.gatewayd.daemon_process import REPO


async def test_an_unreachable_gateway_is_skipped_for_the_next_url(gateway: Gateway) -> None:
    nobody = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    async with AgentClient([nobody, gateway.ws_url], "thermostat", "t-urls") as agent:
        assert agent.connects == 1
        assert agent.url.startswith(gateway.ws_url + "/agents/")
        assert await agent.call("set_target", 21.0) == 21.0
    with pytest.raises(OSError):
        await AgentClient(
            [nobody, f"ws://127.0.0.1:{free_port()}"], "thermostat", "t-urls"
        ).connect()
    urls = f"{nobody},{gateway.ws_url}"
    shown = subprocess.run(
        [sys.executable, "-m", "gatewayd", "agent", "state", "thermostat", "t-urls", "--url", urls],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert shown.returncode == 0, shown.stderr
    assert '"target": 21.0' in shown.stdout
