"""The Python client given several gateway URLs (a group of gateways): it skips a gateway
that cannot be reached for the next one, and fails at once only when none can be reached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.client import AgentClient
from tests.brokers import free_port
from tests.client.daemon import Gateway
from tests.gatewayd.notify import NotifySocket


@pytest.fixture
def gateway(tmp_path: Path, notify: NotifySocket) -> Iterator[Gateway]:
    gw = Gateway(tmp_path, notify)
    gw.process.start()
    try:
        yield gw
    finally:
        gw.process.stop()


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
