"""Names and constants of the decoder graph's I/O, shared by the exporter and the runner
(kept apart so running a converted model never needs the `onnx` package)."""

from __future__ import annotations

MASKED = -1e30  # attention_bias value that hides a key; finite, so a fully hidden row is no NaN


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def new_key(layer: int) -> str:
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"
