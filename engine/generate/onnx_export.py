"""Build an ONNX Llama decoder graph from `LlamaWeights` (fp32 or 4-bit), with onnx alone.

The graph reads a paged KV cache (`engine.generate.kv_pool`) in place and returns the new
tokens' K/V for the host to store:

| name | dtype, shape | meaning |
|---|---|---|
| `input_ids` | int64 [batch, seq] | new tokens (padding rows/columns allowed) |
| `position_ids` | int64 [batch, seq] | their positions (rotary) |
| `block_table` | int64 [batch, blocks] | each row's KV blocks, in order (padding: block 0); at least one column |
| `attention_bias` | float32 [batch, seq, blocks * block_size + seq] | added to attention scores: 0 attends, `MASKED` hides (causal mask and padding are the host's) |
| `logits_index` | int64 [batch, n] | which of the `seq` positions get logits (usually the last real token) |
| `pool_key.{i}`, `pool_value.{i}` | float32 [kv_heads, pool_blocks, block_size, head_dim] | the whole block pool of layer i, as the host holds it (passed without copying) |
| → `logits` | float32 [batch, n, vocab] | |
| → `new_key.{i}`, `new_value.{i}` | float32 [batch, seq, kv_heads, head_dim] | the new tokens' K (after rotary) and V, for the host to store |

Attention runs KV-head-major: the rows' blocks are gathered straight out of the pool
(`Gather` on the block axis: the only copy of the past), the past's and the new tokens' scores
are computed apart (`FusedMatMul` with a transposed operand, no cache transpose or concat)
and joined, softmaxed, and applied to each part. Measured on SmolLM2 at 16 rows x 264 cached
tokens this replaced a host gather plus in-graph Concat and Transpose that took ~60% of a step.

Conventions inside: rotary in the "rotate half" layout (Q/K rows un-permuted from llama.cpp's
interleaved order), the 1/sqrt(head_dim) scale folded into the Q weights, Q/K/V and gate/up
projections fused into one MatMul each, the RMSNorm spelled as the pattern ONNX Runtime fuses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from engine.generate.decoder_io import MASKED, new_key, new_value, pool_key, pool_value
from engine.generate.gguf_model import F32, Q4_BLOCK, BlockQ4, LlamaConfig, LlamaWeights

__all__ = [
    "MASKED",
    "WEIGHT_FORMATS",
    "build_decoder",
    "rotary_tables",
    "save_decoder",
    "unpermute_rows",
]

# fp32: every weight dequantised. q4: the file's Q4_1 layer matrices kept 4-bit, exactly
# (see `linear` in build_decoder); other tensors fp32.
WEIGHT_FORMATS = ("fp32", "q4")

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime the project supports (>= 1.18)


def unpermute_rows(weight: F32, n_heads: int) -> F32:
    """Undo llama.cpp's Q/K row permutation: interleaved rotary pairs back to rotate-half order."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return np.ascontiguousarray(
        weight.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)
    )


def unpermute_index(out_dim: int, n_heads: int) -> NDArray[np.int64]:
    """The row order `unpermute_rows` produces: unpermute_rows(w) == w[unpermute_index(...)]."""
    head_dim = out_dim // n_heads
    return np.arange(out_dim).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(out_dim)


def rotary_tables(config: LlamaConfig) -> tuple[F32, F32]:
    """cos and sin, [context_length, head_dim], in rotate-half layout (each half repeated)."""
    half = config.head_dim // 2
    inv_freq = config.rope_freq_base ** (-np.arange(half, dtype=np.float64) * 2 / config.head_dim)
    angles = np.outer(np.arange(config.context_length, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Graph:
    """A small builder: unique names, initializers, nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs: Any) -> str:
        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=f"n{self._count}", **attrs)
        )
        return out

    def op_n(self, op_type: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        self._count += 1
        outs = [f"{op_type.lower()}_{self._count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._count}", **attrs))
        return outs


def build_decoder(
    weights: LlamaWeights,
    progress: Callable[[str], None] | None = None,
    *,
    weight_format: str = "fp32",
    accuracy_level: int = 0,
) -> onnx.ModelProto:
    """The decoder graph, weights as initializers in `weight_format` (see WEIGHT_FORMATS;
    "q4" needs `read_gguf(..., keep_q4=True)`). `accuracy_level` is MatMulNBits' compute
    type (0: fp32 as the weights say; 4: int8 activations, faster, less exact)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    q4 = weights.q4 if weight_format == "q4" else {}
    cfg = weights.config
    hd, n_heads, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    group = n_heads // n_kv
    g = _Graph()
    i64 = np.int64

    eps = g.const("rms_eps", np.array(cfg.rms_norm_eps, dtype=np.float32))
    two = g.const("two", np.array(2.0, dtype=np.float32))
    neg_one = g.const("neg_one", np.array(-1.0, dtype=np.float32))
    shape_heads = g.const("shape_heads", np.array([0, 0, n_heads, hd], dtype=i64))
    shape_kv = g.const("shape_kv", np.array([0, 0, n_kv, hd], dtype=i64))
    shape_grouped = g.const("shape_grouped", np.array([0, 0, n_kv, group, hd], dtype=i64))
    shape_model = g.const("shape_model", np.array([0, 0, cfg.d_model], dtype=i64))
    shape_rows = g.const("shape_rows", np.array([-1, cfg.d_model], dtype=i64))
    split_qkv = g.const("split_qkv", np.array([cfg.d_model, n_kv * hd, n_kv * hd], dtype=i64))
    split_ffn = g.const("split_ffn", np.array([cfg.d_ff, cfg.d_ff], dtype=i64))
    axis_last = g.const("axis_last", np.array([-1], dtype=i64))
    axes_2 = g.const("axes_2", np.array([2], dtype=i64))
    axes_02 = g.const("axes_02", np.array([0, 2], dtype=i64))
    vocab = g.const("vocab", np.array([cfg.vocab_size], dtype=i64))

    def rms_norm(x: str, weight: F32, name: str) -> str:
        # x / sqrt(mean(x^2) + eps) * w: the pattern ORT fuses into SimplifiedLayerNormalization
        w = g.const(name, weight.astype(np.float32))
        mean = g.op("ReduceMean", g.op("Pow", x, two), axes=[-1], keepdims=1)
        return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps))), w)

    # rotate_half(x) = concat(-x[..., hd/2:], x[..., :hd/2])
    zero = g.const("half_lo", np.array([0], dtype=i64))
    mid = g.const("half_mid", np.array([hd // 2], dtype=i64))
    end = g.const("half_hi", np.array([hd], dtype=i64))

    def rope(x: str, cos: str, sin: str) -> str:
        lo = g.op("Slice", x, zero, mid, axis_last)
        hi = g.op("Slice", x, mid, end, axis_last)
        rotated = g.op("Concat", g.op("Mul", hi, neg_one), lo, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    cos_table, sin_table = rotary_tables(cfg)
    cos = g.op("Unsqueeze", g.op("Gather", g.const("rope_cos", cos_table), "position_ids"), axes_2)
    sin = g.op("Unsqueeze", g.op("Gather", g.const("rope_sin", sin_table), "position_ids"), axes_2)
    bias = g.op("Unsqueeze", "attention_bias", axes_02)  # [1, B, 1, S, T + S]
    # T, the gathered past: blocks per row x block size; the split of scores into past | new
    table_shape = g.op("Shape", "block_table")
    past_tokens = g.op(
        "Mul",
        g.op("Slice", table_shape, g.const("at_1", np.array([1], dtype=i64)), axes_2),
        g.op("Slice", g.op("Shape", pool_key(0)), axes_2, g.const("at_3", np.array([3], i64))),
    )
    new_tokens = g.op(
        "Slice", g.op("Shape", "input_ids"), g.const("at_1b", np.array([1], i64)), axes_2
    )
    split_attention = g.op("Concat", past_tokens, new_tokens, axis=0)
    shape_past = g.op(
        "Concat",
        g.const("kv_heads", np.array([n_kv], dtype=i64)),
        g.op(
            "Slice",
            table_shape,
            g.const("at_0", np.array([0], i64)),
            g.const("at_1c", np.array([1], i64)),
        ),
        past_tokens,
        g.const("head_dim", np.array([hd], dtype=i64)),
        axis=0,
    )  # [KV, B, T, hd]

    embedding = g.const("token_embd", weights.token_embd.astype(np.float32))
    h = g.op("Gather", embedding, "input_ids")
    scale = np.float32(1.0 / np.sqrt(hd))
    outputs: list[str] = []

    shared: dict[str, str] = {}  # constants every 4-bit matmul of a size reuses

    def shared_const(name: str, value: np.ndarray) -> str:
        if name not in shared:
            shared[name] = g.const(name, value)
        return shared[name]

    def linear(x: str, name: str, rows: F32, block: BlockQ4 | None) -> str:
        """x @ rows.T, with the 4-bit form when there is one.

        Q4_1 is value = code * d + m per block of 32. MatMulNBits' fast kernels (MLAS) need
        *integer* zero points, which cannot express m exactly, so the 4-bit matmul runs with
        zero point 0 (x @ (code * d).T) and the block minimums are added exactly by a small
        fp32 matmul: (sum of x over each block) @ m.T, 1/32 of the work."""
        if block is None:
            return g.op("MatMul", x, g.const(name, np.ascontiguousarray(rows.T)))
        out_dim, in_dim = block.shape
        n_blocks = in_dim // Q4_BLOCK
        size = out_dim * ((n_blocks + 1) // 2)  # two 4-bit zero points a byte, per row
        zero_points = shared_const(f"zero_points_{size}", np.zeros(size, np.uint8))
        scaled_codes = g.op(
            "MatMulNBits",
            x,
            g.const(f"{name}.q4", block.packed),
            g.const(f"{name}.scales", block.scales.reshape(-1)),
            zero_points,
            domain="com.microsoft",
            K=in_dim,
            N=out_dim,
            bits=4,
            block_size=Q4_BLOCK,
            accuracy_level=accuracy_level,
        )
        blocks_shape = shared_const(
            f"blocks_{in_dim}", np.array([0, 0, n_blocks, Q4_BLOCK], dtype=np.int64)
        )
        block_sums = g.op(
            "ReduceSum", g.op("Reshape", x, blocks_shape), axis_last, keepdims=0
        )  # [B, S, n_blocks]
        mins = g.const(f"{name}.mins", np.ascontiguousarray(block.block_mins().T))
        return g.op("Add", scaled_codes, g.op("MatMul", block_sums, mins))

    def stacked(i: int, parts: list[tuple[str, NDArray[np.int64] | None, float]]) -> BlockQ4 | None:
        """The named 4-bit matrices of layer i, rows reordered and scaled, one above the other
        (None when any of them is not Q4_1: the fused matrix is then fp32)."""
        blocks = [q4.get(f"blk.{i}.{name}") for name, _, _ in parts]
        if any(b is None for b in blocks):
            return None
        ready = []
        for block, (_, order, factor) in zip(blocks, parts, strict=True):
            assert block is not None
            block = block if order is None else block.take_rows(order)
            ready.append(block if factor == 1.0 else block.scaled(factor))
        return BlockQ4.stack(ready)

    q_order = unpermute_index(cfg.d_model, n_heads)
    k_order = unpermute_index(n_kv * hd, n_kv)
    for i, layer in enumerate(weights.layers):
        if progress:
            progress(f"layer {i + 1}/{cfg.n_layers}")
        wq = unpermute_rows(layer["attn_q"], n_heads) * scale
        wk = unpermute_rows(layer["attn_k"], n_kv)
        wqkv = np.concatenate([wq, wk, layer["attn_v"]], axis=0)
        qkv_q4 = stacked(
            i, [("attn_q", q_order, float(scale)), ("attn_k", k_order, 1.0), ("attn_v", None, 1.0)]
        )
        x = rms_norm(h, layer["attn_norm"], f"blk.{i}.attn_norm")
        qkv = linear(x, f"blk.{i}.attn_qkv", wqkv, qkv_q4)
        q, k, v = g.op_n("Split", [qkv, split_qkv], 3, axis=-1)
        q = rope(g.op("Reshape", q, shape_heads), cos, sin)
        k = rope(g.op("Reshape", k, shape_kv), cos, sin)
        k = g.op("Identity", k, name=new_key(i))
        v = g.op("Reshape", v, shape_kv, name=new_value(i))
        outputs += [k, v]
        # Attention, KV-head-major ([KV, B, ...]) so the gathered past needs no transpose:
        # the past comes straight out of the pool by block, the new tokens' K/V are separate
        # operands (no concatenation of the cache), scores and probabilities are the only
        # things joined.
        past_k = g.op(
            "Unsqueeze",
            g.op("Reshape", g.op("Gather", pool_key(i), "block_table", axis=1), shape_past),
            axes_2,
        )  # [KV,B,1,T,hd]
        past_v = g.op(
            "Unsqueeze",
            g.op("Reshape", g.op("Gather", pool_value(i), "block_table", axis=1), shape_past),
            axes_2,
        )
        new_k = g.op("Unsqueeze", g.op("Transpose", k, perm=[2, 0, 1, 3]), axes_2)  # [KV,B,1,S,hd]
        new_v = g.op("Unsqueeze", g.op("Transpose", v, perm=[2, 0, 1, 3]), axes_2)
        q_grouped = g.op(
            "Transpose", g.op("Reshape", q, shape_grouped), perm=[2, 0, 3, 1, 4]
        )  # [KV, B, G, S, hd]
        scores = g.op(
            "Concat",
            g.op("FusedMatMul", q_grouped, past_k, domain="com.microsoft", transB=1),
            g.op("FusedMatMul", q_grouped, new_k, domain="com.microsoft", transB=1),
            axis=-1,
        )  # [KV, B, G, S, T + S]
        probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
        p_past, p_new = g.op_n("Split", [probs, split_attention], 2, axis=-1)
        attended = g.op(
            "Add", g.op("MatMul", p_past, past_v), g.op("MatMul", p_new, new_v)
        )  # [KV, B, G, S, hd]
        merged = g.op("Reshape", g.op("Transpose", attended, perm=[1, 3, 0, 2, 4]), shape_model)
        wo = layer["attn_output"]
        attn_out = linear(
            merged, f"blk.{i}.attn_output", wo, stacked(i, [("attn_output", None, 1.0)])
        )
        h = g.op("Add", h, attn_out)

        x = rms_norm(h, layer["ffn_norm"], f"blk.{i}.ffn_norm")
        wgu = np.concatenate([layer["ffn_gate"], layer["ffn_up"]], axis=0)
        gu_q4 = stacked(i, [("ffn_gate", None, 1.0), ("ffn_up", None, 1.0)])
        gate_up = linear(x, f"blk.{i}.ffn_gate_up", wgu, gu_q4)
        gate, up = g.op_n("Split", [gate_up, split_ffn], 2, axis=-1)
        activated = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        down = linear(
            activated, f"blk.{i}.ffn_down", layer["ffn_down"], stacked(i, [("ffn_down", None, 1.0)])
        )
        h = g.op("Add", h, down)

    h = rms_norm(h, weights.output_norm, "output_norm")
    picked = g.op("GatherND", h, g.op("Unsqueeze", "logits_index", axis_last), batch_dims=1)
    head = embedding if weights.output is None else g.const("output", weights.output)
    rows = g.op("Gemm", g.op("Reshape", picked, shape_rows), head, transB=1)
    logits_shape = g.op("Concat", g.op("Shape", "logits_index"), vocab, axis=0)
    g.op("Reshape", rows, logits_shape, name="logits")

    pool_shape: list[str | int | None] = [n_kv, "pool_blocks", "block_size", hd]
    new_shape: list[str | int | None] = ["batch", "seq", n_kv, hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(
            "attention_bias", TensorProto.FLOAT, ["batch", "seq", "total"]
        ),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch", "n"]),
        helper.make_tensor_value_info("block_table", TensorProto.INT64, ["batch", "blocks"]),
    ]
    graph_outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "n", cfg.vocab_size])
    ]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"pool_{kind}.{i}", TensorProto.FLOAT, pool_shape)
            )
            graph_outputs.append(
                helper.make_tensor_value_info(f"new_{kind}.{i}", TensorProto.FLOAT, new_shape)
            )
    graph = helper.make_graph(
        g.nodes, weights.name or "llama", inputs, graph_outputs, initializer=g.initializers
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if any(node.domain == "com.microsoft" for node in g.nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = IR_VERSION
    model.producer_name = "gatewayd engine.generate"
    return model


def save_decoder(model: onnx.ModelProto, path: Path) -> None:
    """Write the graph to `path` and its weights to one `path.data` file beside it."""
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
