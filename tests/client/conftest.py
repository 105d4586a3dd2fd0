"""Fixtures of the client tests: a real gateway process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.daemon import Gateway
from tests.gatewayd.notify import NotifySocket


@pytest.fixture
def gateway(tmp_path: Path, notify: NotifySocket) -> Iterator[Gateway]:
    """A gateway serving WebSocket clients (tests/client/daemon.py), stopped afterwards."""
    gw = Gateway(tmp_path, notify)
    gw.process.start()
    try:
        yield gw
    finally:
        gw.process.stop()
