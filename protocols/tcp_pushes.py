"""Pushes (gateway -> device) waiting for the device's ACK, kept per device across its
connections (FRAMES.md section 6).

A push is either *tracked* (`add_tracked`: the gateway's runtime gives its durable seq, the
agent's outbox row id, and a callback for the ACK) or *untracked* (`add`: a handler without an
outbox; the seq is the next one after the highest this process has seen, memory only). Nothing
is dropped here: the gateway's outbox bounds how many pushes an agent may owe. At most `window`
pushes are written to a device's connection and unACKed at a time; later ones follow as ACKs
arrive (`take_window`), in seq order, also after a restart when tracked pushes are handed over
again behind newer ones.

Sans-I/O: no sockets, no clock. Must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

from protocols.link import DeliveredCallback

# HELLO_OK's push_epoch: constant, because push seqs are durable (outbox row ids, never handed
# out twice by an agent's file, also after the rows are deleted: gatewayd/agents/outbox_schema.py)
# and survive restarts; a device applies a push only if its seq is above the last one it applied.
DURABLE_PUSH_EPOCH = 1

PushToWrite = tuple[int, bytes, bool]  # (seq, payload, resend: written to a connection before)


class _DevicePushes:
    __slots__ = ("in_window", "last_seq", "on_delivered", "pending", "sent_before")

    def __init__(self) -> None:
        self.last_seq = 0  # the highest seq this process has seen for the device
        self.pending: dict[int, bytes] = {}  # seq -> payload, in seq order
        self.sent_before: set[int] = set()  # written to some connection already
        self.in_window: set[int] = set()  # written to the current connection, not ACKed
        self.on_delivered: dict[int, DeliveredCallback] = {}


class PushOutbox:
    """Every device's unACKed pushes (see the module docstring)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"push window must be >= 1, got {window}")
        self.window = window
        self._devices: dict[str, _DevicePushes] = {}

    def add(self, device_id: str, payload: bytes) -> int:
        """An untracked push; returns its seq."""
        device = self._device(device_id)
        return self.add_tracked(device_id, device.last_seq + 1, payload, None)

    def add_tracked(
        self, device_id: str, seq: int, payload: bytes, on_delivered: DeliveredCallback | None
    ) -> int:
        device = self._device(device_id)
        if seq in device.pending:
            return seq  # handed over twice (e.g. recovered after a restart): one is enough
        device.pending[seq] = payload
        if seq < device.last_seq:  # handed over again after a restart, behind newer ones
            device.pending = dict(sorted(device.pending.items()))
        device.last_seq = max(device.last_seq, seq)
        if on_delivered is not None:
            device.on_delivered[seq] = on_delivered
        return seq

    def backlog(self, device_id: str) -> int:
        """How many pushes the device has not ACKed (written or waiting)."""
        device = self._devices.get(device_id)
        return 0 if device is None else len(device.pending)

    def reopen(self, device_id: str) -> list[PushToWrite]:
        """A new connection of the device: what to write right after HELLO_OK."""
        device = self._devices.get(device_id)
        if device is None:
            return []
        device.in_window.clear()
        return self.take_window(device_id)

    def take_window(self, device_id: str) -> list[PushToWrite]:
        """Pushes to write now, oldest first, until `window` are unACKed on the connection."""
        device = self._devices.get(device_id)
        if device is None:
            return []
        room = self.window - len(device.in_window)
        result: list[PushToWrite] = []
        if room <= 0:
            return result
        for seq, payload in device.pending.items():
            if seq in device.in_window:
                continue
            result.append((seq, payload, seq in device.sent_before))
            device.in_window.add(seq)
            device.sent_before.add(seq)
            if len(result) >= room:
                break
        return result

    def ack(self, device_id: str, seq: int) -> bool:
        """The device ACKed `seq`; False when it was not outstanding (ignored)."""
        device = self._devices.get(device_id)
        if device is None or device.pending.pop(seq, None) is None:
            return False
        device.sent_before.discard(seq)
        device.in_window.discard(seq)
        callback = device.on_delivered.pop(seq, None)
        if callback is not None:
            callback(seq)
        return True

    def _device(self, device_id: str) -> _DevicePushes:
        device = self._devices.get(device_id)
        if device is None:
            device = self._devices[device_id] = _DevicePushes()
        return device
