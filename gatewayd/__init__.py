"""gatewayd: the daemon — config, CLI, lifecycle and the agent runtime.

    from gatewayd import Agent, callable, Connection

Depends on `protocols` (wire formats and transports) and `engine` (batched inference), never
the other way round: `protocols` and `engine` must never import `gatewayd`. gatewayd itself
must never import `tests` or `bench`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Agent", "Connection", "__version__", "callable"]

if TYPE_CHECKING:
    from gatewayd.agents import Agent, Connection, callable


def __getattr__(name: str) -> Any:
    # Lazy, so `gatewayd --version` and `check-config` do not load the agent runtime.
    if name in ("Agent", "Connection", "callable"):
        from gatewayd import agents

        return getattr(agents, name)
    raise AttributeError(f"module 'gatewayd' has no attribute {name!r}")
