"""Names shared by the converter and the runner: the model directory's files, the decoder
graph's inputs and outputs (kept apart so running a converted model needs neither `onnx` nor
`gguf`)."""

from __future__ import annotations

FORMAT_VERSION = 2  # bump when the graph's I/O or the directory layout changes
DECODER_FILE = "decoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation.json"

MASKED = -1e30  # attention_bias value that hides a key; finite, so a fully hidden row is no NaN


def pool_key(layer: int) -> str:
    return f"pool_key.{layer}"


def pool_value(layer: int) -> str:
    return f"pool_value.{layer}"


def new_key(layer: int) -> str:
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"
