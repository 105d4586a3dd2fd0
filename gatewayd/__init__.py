"""gatewayd: the daemon — config, CLI, lifecycle and the agent runtime.

Depends on `protocols` (wire formats and transports) and `engine` (batched inference), never
the other way round: `protocols` and `engine` must never import `gatewayd`. gatewayd itself
must never import `tests` or `bench`.
"""

__version__ = "0.1.0"
