"""gatewayd: the daemon — config, CLI, lifecycle and the agent runtime.

Depends on `protocols` (wire formats and transports) and `engine` (batched inference);
neither of those may ever import `gatewayd`.
"""

__version__ = "0.1.0"
