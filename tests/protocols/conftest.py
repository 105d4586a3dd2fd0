"""Fixtures the MQTT bridge's test modules share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.protocols.mqtt_bridge_runner import SqliteLinkHandler

HandlerFactory = Callable[..., Awaitable[SqliteLinkHandler]]


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
