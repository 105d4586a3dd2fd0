"""The bridge sends a message's PUBACK only after its turn committed, with either MQTT client
(`[mqtt] client`), as the broker itself sees it: Mosquitto's debug log lists every packet
it received from the bridge, in the order the bridge's connection carried them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocols.mqtt import MqttBridge
from tests.brokers import MosquittoBroker
from tests.protocols.mqtt_bridge_runner import SqliteLinkHandler
from tests.protocols.test_mqtt import publish_all, read_messages, settings_for
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("mqtt_client")


class GatedCommits(SqliteLinkHandler):
    """Holds every commit that carries a message until `gate` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.holding = threading.Event()

    def _commit(self, events: list[Any]) -> None:
        if any(e.kind == "message" for e in events):
            self.holding.set()
            self.gate.wait(30)
        super()._commit(events)


@pytest.fixture
def logged_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config="log_type debug")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_no_puback_before_the_commit(
    logged_broker: MosquittoBroker, handler_factory, tmp_path
):
    broker = logged_broker
    handler = await handler_factory(cls=GatedCommits)
    bridge = MqttBridge(settings_for(broker, keepalive_s=1), handler)
    await bridge.start()
    try:
        await bridge.wait_connected(timeout_s=5)
        await publish_all(broker, [("devices/d1/telemetry", b"m1")])
        await wait_until(handler.holding.is_set, 5, "the turn to reach its commit")

        def log() -> str:
            return broker.log_path.read_text(errors="replace")

        sent = log().index("Sending PUBLISH to gw-test (d0, q1")
        # A PINGREQ on the same connection after the message: had the bridge acked on
        # arrival, the broker would have read that PUBACK before this PINGREQ.
        await wait_until(
            lambda: "Received PINGREQ from gw-test" in log()[sent:], 5, "a keepalive ping"
        )
        assert "Received PUBACK from gw-test" not in log()
        handler.gate.set()
        await wait_until(lambda: "Received PUBACK from gw-test" in log(), 5, "the PUBACK")
        assert [p for *_, p in read_messages(tmp_path / "agents.sqlite")] == [b"m1"]
    finally:
        handler.gate.set()
        await bridge.stop()
