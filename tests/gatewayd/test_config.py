"""Config: the example validates; each class of error names file, key path, expected and found."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.config import ConfigError, load_config, parse_config
from gatewayd.units import parse_duration_s, parse_size_bytes

REPO = Path(__file__).resolve().parents[2]


def _error(data: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "gw.toml")
    return str(caught.value)


def test_example_config_validates() -> None:
    config = load_config(REPO / "config.example.toml")
    assert config.agents.classes, "the example declares at least one agent class"
    assert config.gateway.drain_timeout > 0


def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    message = _error({"listeners": {"binary": {"bnid": "127.0.0.1:1"}}}, tmp_path)
    assert (
        "gw.toml: listeners.binary.bnid: unknown key; did you mean 'listeners.binary.bind'?"
        in message
    )


def test_unknown_key_inside_a_named_table(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    message = _error({"models": {"anomaly": {"path": str(model), "bukets": [1]}}}, tmp_path)
    assert "models.anomaly.bukets: unknown key; did you mean 'models.anomaly.buckets'?" in message


def test_unknown_top_level_table(tmp_path: Path) -> None:
    assert "gatewy: unknown key; did you mean 'gateway'?" in _error({"gatewy": {}}, tmp_path)


def test_wrong_type_says_expected_and_found(tmp_path: Path) -> None:
    message = _error({"agents": {"max_active": "lots"}}, tmp_path)
    assert "agents.max_active:" in message
    assert "valid integer" in message
    assert "found 'lots'" in message


def test_bind_must_be_host_port(tmp_path: Path) -> None:
    message = _error({"listeners": {"websocket": {"bind": "localhost"}}}, tmp_path)
    assert "listeners.websocket.bind: expected 'host:port'" in message
    assert "found 'localhost'" in message


def test_bind_parses_ipv6() -> None:
    config = parse_config({"listeners": {"websocket": {"bind": "[::1]:9000"}}})
    assert config.listeners.websocket.bind == ("::1", 9000)


def test_duration_needs_a_unit(tmp_path: Path) -> None:
    message = _error({"gateway": {"drain_timeout": "10"}}, tmp_path)
    assert "gateway.drain_timeout: expected a duration like '30s'" in message


def test_missing_file_is_named_with_its_key(tmp_path: Path) -> None:
    message = _error({"models": {"anomaly": {"path": "nope.onnx"}}}, tmp_path)
    assert f"models.anomaly.path: file not found: {tmp_path / 'nope.onnx'}" in message


def test_route_to_undeclared_agent_class(tmp_path: Path) -> None:
    data = {"mqtt": {"routes": [{"topic": "d/{id}/t", "agent_class": "pump"}]}}
    assert "mqtt.routes.0.agent_class: no agent class named 'pump'" in _error(data, tmp_path)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = _error({"gateway": {"log_level": "loud", "drain_timeout": 3}}, tmp_path)
    assert "gateway.log_level" in message and "gateway.drain_timeout" in message


def test_invalid_toml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[gateway]\nlog_level = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML: .*line 2"):
        load_config(path)


def test_secret_from_file_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pass").write_text("s3cret\n")
    path = tmp_path / "gw.toml"
    path.write_text(
        '[mqtt]\nusername = "gw"\npassword_file = "mqtt.pass"\n[gateway]\nstate_dir = "st"\n'
    )
    config = load_config(path)
    assert config.mqtt.resolved_password() == "s3cret"
    assert config.gateway.state_dir == tmp_path / "st"


def test_password_and_password_file_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "p").write_text("x")
    message = _error({"mqtt": {"password": "a", "password_file": str(tmp_path / "p")}}, tmp_path)
    assert "set either password or password_file, not both" in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("2ms", 0.002), ("1.5m", 90.0), ("1h", 3600.0), ("250us", 0.00025)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GiB", 1024**3), ("64KiB", 65536), ("10MB", 10_000_000), (512, 512), ("2 MiB", 2 * 1024**2)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size_bytes(text) == size


@pytest.mark.parametrize("bad", ["1 parsec", "-5", "GiB", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size_bytes(bad)


@pytest.mark.parametrize(
    ("data", "key", "found"),
    [
        ({"http": {"enabled": "yes"}}, "http.enabled", "'yes'"),
        ({"listeners": {"websocket": {"enabled": 1}}}, "listeners.websocket.enabled", "1"),
        ({"agents": {"max_active": "10"}}, "agents.max_active", "'10'"),
        ({"agents": {"max_active": 10.0}}, "agents.max_active", "10.0"),
        ({"mqtt": {"qos": "1"}}, "mqtt.qos", "'1'"),
        ({"mqtt": {"broker_urls": "mqtt://h:1883"}}, "mqtt.broker_urls", "'mqtt://h:1883'"),
        ({"gateway": {"state_dir": 5}}, "gateway.state_dir", "5"),
    ],
)
def test_types_are_strict(data: dict, key: str, found: str, tmp_path: Path) -> None:
    message = _error(data, tmp_path)
    assert f"{key}:" in message and f"found {found}" in message


def test_strict_model_types(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    message = _error({"models": {"m": {"path": str(model), "cpu_threads": "1"}}}, tmp_path)
    assert "models.m.cpu_threads: Input should be a valid integer; found '1'" in message


def test_strict_types_keep_units_binds_and_paths_working(tmp_path: Path) -> None:
    config = parse_config(
        {
            "gateway": {"state_dir": "st", "drain_timeout": "250ms"},
            "agents": {"max_db_size": "64MiB", "max_message_size": 4096},
            "listeners": {"websocket": {"bind": "127.0.0.1:1", "enabled": False}},
            "mqtt": {"qos": 0},
        },
        tmp_path / "gw.toml",
    )
    assert config.gateway.state_dir == tmp_path / "st"
    assert config.gateway.drain_timeout == pytest.approx(0.25)
    assert (config.agents.max_db_size, config.agents.max_message_size) == (64 * 1024**2, 4096)
    assert config.listeners.websocket.bind == ("127.0.0.1", 1)
    assert config.listeners.websocket.enabled is False and config.mqtt.qos == 0


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.parametrize("content", ["", "\n", "   \nsecond-line\n"])
def test_empty_password_file_is_a_config_error_naming_the_file(
    content: str, tmp_path: Path
) -> None:
    (tmp_path / "mqtt.pass").write_text(content)
    path = tmp_path / "gw.toml"
    path.write_text(
        '[mqtt]\nenabled = true\nusername = "gw"\npassword_file = "mqtt.pass"\n'
        '[[mqtt.routes]]\ntopic = "d/{id}/t"\nagent_class = "thermostat"\nreply_topic = "d/{id}/c"\n'
        '[agents.classes.thermostat]\nclass = "gatewayd.examples.thermostat:Thermostat"\n'
    )
    result = _check_config(path)
    assert result.returncode == 78, result.stderr
    assert f"password_file {tmp_path / 'mqtt.pass'}: the first line is empty" in result.stderr
    assert "Traceback" not in result.stderr
