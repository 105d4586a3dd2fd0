"""The MQTT bounds in the config file reach the bridge, and `gatewayd dead-letters list|replay`
works on the dead-letter file under the state dir, against a real Mosquitto."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import aiomqtt
import pytest

from gatewayd import Connection
from gatewayd.agents import AgentRuntime
from gatewayd.config import ConfigError, load_config, parse_config
from gatewayd.wiring import (
    agent_settings,
    build_transports,
    check_references,
    load_agent_classes,
    mqtt_dead_letters_path,
    mqtt_settings,
)
from protocols.dead_letters import DeadLetterStore
from protocols.mqtt import MqttBridge
from tests.brokers import MosquittoBroker
from tests.gatewayd.e2e_agents import Recorder
from tests.protocols.test_mqtt import publish_all
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
[gateway]
state_dir = "state"

[agents.classes.thermostat]
class = "gatewayd.examples.thermostat:Thermostat"

[mqtt]
enabled = true
broker_urls = ["{url}"]
client_id = "gw-cli-test"
link_idle_timeout = "90s"
max_attempts = 7

[[mqtt.routes]]
topic = "devices/{{id}}/telemetry"
agent_class = "thermostat"
reply_topic = "devices/{{id}}/cmd"
allowed_ids_file = "allowed.txt"
allowed_id_pattern = '{pattern}'
max_new_agents_per_minute = 30
"""


class Picky(Recorder):
    """A Recorder whose turn fails on the payload b"poison"."""

    def on_message(self, conn: Connection, message: bytes | str) -> None:
        if message == b"poison":
            raise ValueError("cannot parse a poison reading")
        super().on_message(conn, message)


def write_config(tmp_path: Path, url: str, pattern: str = r"th-\d+") -> Path:
    (tmp_path / "allowed.txt").write_text("# our pumps\npump-1\n\n  pump-2  \n")
    path = tmp_path / "gatewayd.toml"
    path.write_text(CONFIG.format(url=url, pattern=pattern))
    return path


def test_bounds_in_the_config_reach_the_bridge_settings(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "mqtt://127.0.0.1:1883"))
    settings = mqtt_settings(config.mqtt)
    assert (settings.link_idle_timeout_s, settings.max_attempts) == (90.0, 7)
    [route] = settings.routes
    assert route.allowed_ids == frozenset({"pump-1", "pump-2"})
    assert (route.allowed_id_pattern, route.max_new_agents_per_minute) == (r"th-\d+", 30)
    assert mqtt_dead_letters_path(config) == tmp_path / "state" / "mqtt-dead-letters.sqlite3"


def test_a_bad_allow_pattern_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "mqtt://127.0.0.1:1883", pattern="th-(")
    with pytest.raises(ConfigError, match=r"routes\[0\]\.allowed_id_pattern: 'th-\('"):
        check_references(load_config(path), path)


async def gatewayd(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_dead_letters_list_and_replay_through_the_broker(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    path = write_config(tmp_path, mosquitto.url)
    store = DeadLetterStore(mqtt_dead_letters_path(load_config(path)))
    ids = [
        store.add(
            topic=f"devices/{name}/telemetry",
            payload=name.encode(),
            qos=1,
            error="ValueError('bad reading')",
            attempts=7,
            first_failed_at=1_700_000_000.0,
            last_failed_at=1_700_000_060.0,
        )
        for name in ("pump-1", "pump-2")
    ]

    code, out, _ = await gatewayd("dead-letters", "list", "-c", str(path))
    assert code == 0
    for name in ("pump-1", "pump-2"):
        assert f"devices/{name}/telemetry  attempts=7" in out
    assert "first=2023-11-14T22:13:20Z" in out and "ValueError('bad reading')" in out

    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as device:
        await device.subscribe("devices/+/telemetry", qos=1)
        code, out, _ = await gatewayd("dead-letters", "replay", "-c", str(path), str(ids[0]))
        assert code == 0 and f"replayed dead letter #{ids[0]}" in out
        async with asyncio.timeout(5):
            message = await anext(aiter(device.messages))
        assert (message.topic.value, message.payload) == ("devices/pump-1/telemetry", b"pump-1")
        assert [letter.id for letter in store.list()] == [ids[1]]

        code, _, err = await gatewayd("dead-letters", "replay", "-c", str(path), "999")
        assert code == 1 and "no dead letter #999" in err
        code, _, err = await gatewayd("dead-letters", "replay", "-c", str(path))
        assert code == 2 and "--all" in err

        code, out, _ = await gatewayd("dead-letters", "replay", "-c", str(path), "--all")
        assert code == 0 and f"replayed dead letter #{ids[1]}" in out
        async with asyncio.timeout(5):
            message = await anext(aiter(device.messages))
        assert message.payload == b"pump-2"

    code, out, _ = await gatewayd("dead-letters", "list", "-c", str(path))
    assert code == 0 and "no dead letters" in out
    code, _, err = await gatewayd("dead-letters", "list", "-c", str(tmp_path / "missing.toml"))
    assert code == 78 and "missing.toml" in err


async def test_random_ids_through_the_real_runtime_leave_bounded_agents_and_connections(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    data = {
        "gateway": {"state_dir": str(state_dir)},
        "agents": {"classes": {"picky": {"class": f"{__name__}:Picky"}}},
        "mqtt": {
            "enabled": True,
            "broker_urls": [mosquitto.url],
            "client_id": "gw-flood",
            "link_idle_timeout": "200ms",
            "max_attempts": 2,
            "routes": [
                {
                    "topic": "devices/{id}/telemetry",
                    "agent_class": "picky",
                    "reply_topic": "devices/{id}/cmd",
                    "max_new_agents_per_minute": 5,
                }
            ],
        },
    }
    config = parse_config(data, tmp_path / "gw.toml")
    runtime = AgentRuntime(agent_settings(config), load_agent_classes(config))
    await runtime.start()
    bridge = build_transports(config, runtime)["mqtt"]
    assert isinstance(bridge, MqttBridge)
    await bridge.start()
    try:
        await bridge.wait_connected(timeout_s=5)

        def stats() -> dict[str, int]:
            return bridge.stats.extra

        ids = [uuid.uuid4().hex for _ in range(40)]
        await publish_all(mosquitto, [(f"devices/{i}/telemetry", b"hello") for i in ids])
        await wait_until(lambda: stats().get("new_agent_refused") == 35, 10, "35 refusals")
        await wait_until(lambda: stats().get("applied") == 5, 10, "5 admitted")
        agent_files = list((state_dir / "agents").rglob("*.sqlite3"))
        assert len(agent_files) == 5

        # Idle links close, and the runtime drops their connections.
        await wait_until(lambda: stats().get("links_evicted") == 5, 5, "5 evictions")
        await wait_until(
            lambda: runtime.stats()["connections_open"] == 0, 5, "the runtime's connections"
        )
        # A known device comes back although the new-agent budget is spent; its poison
        # message is retried twice, dead-lettered and acked.
        admitted = ids[:5]  # one publisher connection: the broker keeps its order
        await publish_all(
            mosquitto,
            [
                (f"devices/{admitted[0]}/telemetry", b"back"),
                (f"devices/{admitted[1]}/telemetry", b"poison"),
            ],
        )
        await wait_until(lambda: stats().get("applied") == 6, 10, "the known device")
        await wait_until(lambda: stats().get("dead_lettered") == 1, 10, "the dead letter")
        assert stats()["new_agent_refused"] == 35
        [letter] = DeadLetterStore(mqtt_dead_letters_path(config)).list()
        assert letter.topic == f"devices/{admitted[1]}/telemetry" and letter.attempts == 2
        assert "cannot parse a poison reading" in letter.error
        await wait_until(lambda: stats()["pending"] == 0, 5, "the acks")
        assert len(list((state_dir / "agents").rglob("*.sqlite3"))) == 5
    finally:
        await bridge.stop(5.0)
        await runtime.drain(5.0)
        await runtime.close()
