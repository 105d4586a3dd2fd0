"""Which operators an ONNX model file uses, read with the `onnx` package.

The batcher runs a lone request on the event loop's thread by default (no thread hop) only
for models whose run time cannot depend on the input values: no control flow (`Loop` runs
as many steps as a tensor says) and nothing outside the standard operator sets. `onnx` is
an optional dependency here (the `cpu`/`gpu` extras install it; the runtime itself needs only
`onnxruntime`): without it, or for a file it cannot parse, the answer is None and the caller
assumes the worst (lone requests stay on the worker thread). Files larger than
`MAX_PARSED_BYTES` are not parsed (parsing loads every weight into memory; such models do not
run within the inline limit anyway).
"""

from __future__ import annotations

from pathlib import Path

# Operators whose work the input values can make unbounded (or that hide such a graph).
CONTROL_FLOW = frozenset({"Loop", "If", "Scan"})
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MAX_PARSED_BYTES = 64 * 1024 * 1024


def op_types(path: Path) -> set[tuple[str, str]] | None:
    """`{(domain, op_type)}` of the main graph's nodes ("" = the default domain), or None if
    the file cannot be read as an ONNX model (or `onnx` is not installed)."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        return None
    try:
        if path.stat().st_size > MAX_PARSED_BYTES:
            return None
        model = onnx.load_model(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError, RuntimeError):
        return None
    if not model.HasField("graph") or not model.graph.node:
        return None
    return {(node.domain, node.op_type) for node in model.graph.node}


def unbounded_ops(ops: set[tuple[str, str]]) -> list[str]:
    """The ops of `ops` whose run time the input values may set: control flow, and anything
    outside the standard domains ("domain:op"); sorted, empty when there are none."""
    return sorted(
        f"{domain}:{op}" if domain else op
        for domain, op in ops
        if domain not in STANDARD_DOMAINS or op in CONTROL_FLOW
    )
