"""Fixtures the MQTT bridge's test modules share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.protocols.mqtt_bridge_runner import SqliteLinkHandler

HandlerFactory = Callable[..., Awaitable[SqliteLinkHandler]]


@pytest.fixture(params=["native", "aiomqtt"])
def mqtt_client(request: pytest.FixtureRequest) -> Iterator[str]:
    """The MQTT bridge's client library (`[mqtt] client`) for `settings_for` in
    tests.protocols.test_mqtt: a test using this fixture runs once with each. The slow
    end-to-end tests pin it to "native" (`parametrize("mqtt_client", ["native"],
    indirect=True)`): the aiomqtt path is the one the suite ran before the native client."""
    from tests.protocols import test_mqtt

    test_mqtt.CLIENT_KIND = request.param
    try:
        yield request.param
    finally:
        test_mqtt.CLIENT_KIND = "native"


@pytest.fixture
async def handler_factory(tmp_path: Path) -> AsyncIterator[HandlerFactory]:
    """Makes started `SqliteLinkHandler`s (or subclasses: `cls=`) on `tmp_path/agents.sqlite`;
    stops them all at teardown."""
    handlers: list[SqliteLinkHandler] = []

    async def make(cls: type[SqliteLinkHandler] = SqliteLinkHandler, **kw: Any) -> Any:
        handler = cls(tmp_path / "agents.sqlite", **kw)
        await handler.start()
        handlers.append(handler)
        return handler

    yield make
    for handler in handlers:
        await handler.stop()
