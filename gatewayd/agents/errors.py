"""Exceptions of the agent runtime; messages say which agent and what to do."""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Base class of every error raised by gatewayd.agents."""


class TurnTimeoutError(AgentError):
    """A hook did not return within `turn_timeout_s`; the turn was rolled back."""


class ValueTooLargeError(AgentError):
    """A value written to agent storage exceeds `max_value_bytes`."""


class StorageFullError(AgentError):
    """The agent's database reached its `max_db_bytes` cap."""


class StorageError(AgentError):
    """The agent's database could not be opened or is not the agent's."""


class StateRejectedError(AgentError):
    """`validate_state_change` refused a new state, or the state is not JSON."""


class ReadonlyConnectionError(AgentError):
    """A read-only connection tried to change the agent's state."""


class NotInTurnError(AgentError):
    """Storage was used outside a turn (e.g. from a background task)."""


class RpcError(AgentError):
    """An RPC could not be invoked (unknown or non-callable method, bad arguments)."""


class NoEngineError(AgentError):
    """`infer()` was called but the runtime has no inference engine."""


class MailboxFullError(AgentError):
    """A call was refused because the agent's mailbox (`max_mailbox_events`) or the runtime's
    pending calls (`max_pending_calls`) are full; nothing was queued. Retry later."""


class CommitError(AgentError):
    """The turn's transaction could not be committed; its outputs were dropped."""


class ScheduleFailedError(AgentError):
    """A scheduled method kept failing and its retries are used up (passed to `on_error`)."""


class QueueItemFailedError(AgentError):
    """A queued method kept failing and became a dead letter (passed to `on_error`)."""


class SequenceGapError(AgentError):
    """A message arrived while an earlier sequence number of its stream is still unapplied."""

    def __init__(self, dedup: Any, last_applied: int) -> None:
        super().__init__(
            f"stream {dedup.stream!r}: seq {dedup.seq} not applied because seq "
            f"{last_applied + 1} is still unapplied (last applied {last_applied}); resend in order"
        )


class CorruptDatabaseError(StorageError):
    """The agent's SQLite file is damaged, or belongs to another agent: it gets quarantined."""


class AgentQuarantinedError(AgentError):
    """The agent is quarantined because its database file is corrupt; its events are refused
    (not acknowledged) until the file is restored or moved aside (see quarantine.py)."""


class DiskFullError(StorageFullError):
    """The file system of the state directory is full: nothing commits until space returns."""
