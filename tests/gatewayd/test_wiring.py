"""One settings schema: the config model is the single source of defaults. Each component's
settings, built by `wiring` from a config that sets nothing, equal the component's own
defaults, so a transport or the engine used alone (tests, bench) behaves as the daemon does."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from engine import ModelSpec
from gatewayd import wiring
from gatewayd.agents import AgentSettings
from gatewayd.config import parse_config
from protocols.mqtt_settings import MqttRoute, MqttSettings
from protocols.tcp import TcpSettings
from protocols.ws import WsSettings

ROUTE = {"topic": "d/{id}/t", "agent_class": "a", "reply_topic": "d/{id}/c"}
AGENTS = {"classes": {"a": {"class": "gatewayd.examples.thermostat:Thermostat"}}}


def _differences(built: Any, defaults: Any, not_from_config: set[str]) -> dict[str, Any]:
    """Fields (set from a config key) where the wired value is not the component's default."""
    return {
        f.name: (getattr(built, f.name), getattr(defaults, f.name))
        for f in dataclasses.fields(built)
        if f.init
        and f.name not in not_from_config
        and getattr(built, f.name) != getattr(defaults, f.name)
    }


def test_agent_runtime_defaults_are_the_configs() -> None:
    config = parse_config({})
    built = wiring.agent_settings(config)
    assert _differences(built, AgentSettings(state_dir=config.gateway.state_dir), set()) == {}


def test_websocket_defaults_are_the_configs() -> None:
    built = wiring.ws_settings(parse_config({}).listeners.websocket)
    assert _differences(built, WsSettings(), set()) == {}


def test_mqtt_defaults_are_the_configs() -> None:
    built = wiring.mqtt_settings(parse_config({"agents": AGENTS, "mqtt": {"routes": [ROUTE]}}).mqtt)
    defaults = MqttSettings(routes=(MqttRoute(ROUTE["topic"], "a", ROUTE["reply_topic"]),))
    assert _differences(built, defaults, set()) == {}


def test_tcp_defaults_are_the_configs(tmp_path: Path) -> None:
    secrets = tmp_path / "devices.toml"
    secrets.write_text('"d1" = "secret-1"\n')
    secrets.chmod(0o600)
    binary = {"enabled": True, "agent_class": "a", "secrets_file": str(secrets)}
    config = parse_config({"agents": AGENTS, "listeners": {"binary": binary}})
    built = wiring.tcp_settings(config.listeners.binary)
    defaults = TcpSettings(agent_class="a")  # the route is required: it has no default
    assert _differences(built, defaults, {"secrets"}) == {}
    assert dict(built.secrets) == {"d1": "secret-1"}


def test_engine_defaults_are_the_configs(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not loaded here")
    config = parse_config({"models": {"m": {"path": str(model)}}}, tmp_path / "gw.toml")
    [built] = wiring.model_specs(config)
    # The TensorRT cache goes under the state directory: derived, not a key of its own.
    assert _differences(built, ModelSpec("m", model), {"cache_dir"}) == {}
    assert built.cache_dir == config.gateway.state_dir / "tensorrt" / "m"


def test_settings_never_show_secrets_when_printed(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pass").write_text("mqtt-secret-81f2\n")
    secrets = tmp_path / "devices.toml"
    secrets.write_text('"d1" = "device-secret-3c9a"\n')
    secrets.chmod(0o600)
    config = parse_config(
        {
            "agents": AGENTS,
            "mqtt": {"username": "gw", "password_file": "mqtt.pass", "routes": [ROUTE]},
            "listeners": {
                "binary": {"enabled": True, "agent_class": "a", "secrets_file": str(secrets)}
            },
        },
        tmp_path / "gw.toml",
    )
    mqtt = wiring.mqtt_settings(config.mqtt)
    tcp = wiring.tcp_settings(config.listeners.binary)
    assert mqtt.password == "mqtt-secret-81f2"
    printed = f"{mqtt!r} {mqtt} {tcp!r} {tcp}"
    assert "mqtt-secret-81f2" not in printed and "device-secret-3c9a" not in printed
