"""Which operators an ONNX model file uses, read straight from its protobuf encoding.

The batcher runs a lone request on the event loop's thread by default (no thread hop) only
for models whose run time cannot depend on the input values: no control flow (`Loop` runs
as many steps as a tensor says) and nothing outside the standard operator sets. `onnx` is
not a runtime dependency (only `onnxruntime` is), and parsing a whole model with it would
load every weight; this walks the few fields it needs (ModelProto.graph -> GraphProto.node
-> NodeProto.op_type/domain) over a memory map and skips everything else, weights included,
by their length prefix. Anything it cannot read gives None: the caller then assumes the
worst.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# Wire types of the protobuf encoding.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# Field numbers from onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_NODE = 1
_NODE_OP_TYPE, _NODE_DOMAIN = 4, 7

# Operators whose work the input values can make unbounded (or that hide such a graph).
CONTROL_FLOW = frozenset({"Loop", "If", "Scan"})
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


class _Malformed(Exception):
    pass


def op_types(path: Path) -> set[tuple[str, str]] | None:
    """`{(domain, op_type)}` of the main graph's nodes ("" = the default domain), or None if
    the file cannot be read as an ONNX model."""
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                found: set[tuple[str, str]] = set()
                for graph_start, graph_end in _fields(view, 0, len(view), _MODEL_GRAPH):
                    for node_start, node_end in _fields(view, graph_start, graph_end, _GRAPH_NODE):
                        found.add(_node_op(view, node_start, node_end))
                return found
            finally:
                view.release()
    except (OSError, ValueError, _Malformed, UnicodeDecodeError):
        return None


def unbounded_ops(ops: set[tuple[str, str]]) -> list[str]:
    """The ops of `ops` whose run time the input values may set: control flow, and anything
    outside the standard domains ("domain:op"); sorted, empty when there are none."""
    return sorted(
        f"{domain}:{op}" if domain else op
        for domain, op in ops
        if domain not in STANDARD_DOMAINS or op in CONTROL_FLOW
    )


def _node_op(view: memoryview, start: int, end: int) -> tuple[str, str]:
    op_type = domain = ""
    position = start
    while position < end:
        key, position = _varint(view, position, end)
        field, wire = key >> 3, key & 7
        if wire == _LEN:
            length, position = _varint(view, position, end)
            if position + length > end:
                raise _Malformed
            if field == _NODE_OP_TYPE:
                op_type = bytes(view[position : position + length]).decode()
            elif field == _NODE_DOMAIN:
                domain = bytes(view[position : position + length]).decode()
            position += length
        else:
            position = _skip(view, position, end, wire)
    if not op_type:
        raise _Malformed
    return domain, op_type


def _fields(view: memoryview, start: int, end: int, wanted: int) -> list[tuple[int, int]]:
    """(start, end) of every length-delimited field number `wanted` in view[start:end]."""
    found = []
    position = start
    while position < end:
        key, position = _varint(view, position, end)
        field, wire = key >> 3, key & 7
        if wire == _LEN:
            length, position = _varint(view, position, end)
            if position + length > end:
                raise _Malformed
            if field == wanted:
                found.append((position, position + length))
            position += length
        else:
            position = _skip(view, position, end, wire)
    if position != end:
        raise _Malformed
    return found


def _skip(view: memoryview, position: int, end: int, wire: int) -> int:
    if wire == _VARINT:
        return _varint(view, position, end)[1]
    if wire == _I64:
        return position + 8
    if wire == _I32:
        return position + 4
    raise _Malformed  # groups (3, 4) and unknown wire types are not in ONNX files


def _varint(view: memoryview, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise _Malformed
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
