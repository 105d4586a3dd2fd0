"""The ONNX decoder computes what llama.cpp computes: its logits equal a float64 numpy reference
forward pass over the same GGUF weights, within rtol = atol = 1e-4 (fp32 against fp64), for a
whole prompt at once, token by token through the paged KV-pool inputs, and for a padded batch of
sequences of different lengths (the layout continuous batching uses). Both weight formats:
fp32 (dequantised) and q4 (the Q4_1 matrices kept 4-bit in MatMulNBits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from engine.generate.decoder_io import MASKED
from engine.generate.onnx_export import unpermute_index, unpermute_rows
from tests.engine.generate import tiny_llama
from tests.engine.generate.llama_reference import ReferenceLlama

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
KV_SHAPE = (tiny_llama.N_KV_HEADS, tiny_llama.D_MODEL // tiny_llama.N_HEADS)
PROMPT = [1, 40, 75, 3, 200, 201, 9, 17, 260, 88, 120, 2, 33, 47]


@pytest.fixture(scope="module", params=["fp32", "q4"])
def session(request: pytest.FixtureRequest) -> ort.InferenceSession:
    fixture = "tiny_model_dir" if request.param == "fp32" else "tiny_q4_model_dir"
    model_dir: Path = request.getfixturevalue(fixture)
    return ort.InferenceSession(str(model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> ReferenceLlama:
    return ReferenceLlama(tiny_gguf)


def run(
    session: ort.InferenceSession,
    ids: list[list[int]],
    positions: list[list[int]],
    bias: np.ndarray,
    logits_index: list[list[int]],
    past: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """logits and [new_key.0, new_value.0, new_key.1, ...], for a contiguous past per row
    ([batch, past, kv_heads, head_dim] per layer and kind), fed as the graph wants it: a pool
    of one-token blocks (block 0 the zero block) and a block table (block 0 once when there
    is no past, with its score column hidden)."""
    batch = len(ids)
    width = 0 if past is None else past[0].shape[1]
    bias = bias.astype(np.float32)
    if width == 0:
        bias = np.concatenate([np.full((*bias.shape[:2], 1), MASKED, np.float32), bias], axis=2)
        table = np.zeros((batch, 1), np.int64)
    else:
        table = 1 + np.arange(batch * width, dtype=np.int64).reshape(batch, width)
    feeds: dict[str, Any] = {
        "input_ids": np.array(ids, np.int64),
        "position_ids": np.array(positions, np.int64),
        "attention_bias": bias,
        "logits_index": np.array(logits_index, np.int64),
        "block_table": table,
    }
    for layer in range(tiny_llama.N_LAYERS):
        for j, kind in enumerate(("key", "value")):
            pool = np.zeros((KV_SHAPE[0], 1 + batch * width, 1, KV_SHAPE[1]), np.float32)
            if past is not None:  # [B, T, KV, hd] -> [KV, B * T, 1, hd] after the zero block
                rows = (
                    past[2 * layer + j]
                    .transpose(2, 0, 1, 3)
                    .reshape(KV_SHAPE[0], -1, 1, KV_SHAPE[1])
                )
                pool[:, 1:] = rows
            feeds[f"pool_{kind}.{layer}"] = pool
    logits, *new = session.run(None, feeds)
    return logits, new


def causal(n: int, past: int = 0) -> np.ndarray:
    bias = np.zeros((n, past + n), np.float32)
    bias[:, past:] = np.triu(np.full((n, n), MASKED, np.float32), k=1)
    return bias


def test_whole_prompt_logits_equal_the_reference(session: Any, reference: ReferenceLlama) -> None:
    n = len(PROMPT)
    logits, new = run(session, [PROMPT], [list(range(n))], causal(n)[None], [list(range(n))])
    np.testing.assert_allclose(logits[0], reference.logits(PROMPT), **TOLERANCE)
    assert new[0].shape == (1, n, *KV_SHAPE)


def test_prefill_then_token_by_token_through_past_kv_equals_the_reference(
    session: Any, reference: ReferenceLlama
) -> None:
    expected = reference.logits(PROMPT)
    split = 5
    logits, past = run(
        session, [PROMPT[:split]], [list(range(split))], causal(split)[None], [[split - 1]]
    )
    np.testing.assert_allclose(logits[0, 0], expected[split - 1], **TOLERANCE)
    for position in range(split, len(PROMPT)):
        logits, new = run(
            session, [[PROMPT[position]]], [[position]], causal(1, position)[None], [[0]], past
        )
        np.testing.assert_allclose(logits[0, 0], expected[position], **TOLERANCE)
        past = [np.concatenate([p, n], axis=1) for p, n in zip(past, new, strict=True)]


def test_a_padded_batch_of_different_lengths_equals_each_sequence_alone(
    session: Any, reference: ReferenceLlama
) -> None:
    """Row 0 has 4 cached tokens and 3 new ones; row 1 has 7 cached and 1 new (padded to 3)."""
    first, second = PROMPT[:7], PROMPT[3:11]
    past_len = (4, 7)
    rows = [(first[:4], first[4:]), (second[:7], second[7:])]
    pasts = []
    for cached, _ in rows:
        _, kv = run(session, [cached], [list(range(len(cached)))], causal(len(cached))[None], [[0]])
        pasts.append(kv)
    width, seq = max(past_len), 3
    past = [np.zeros((2, width, *KV_SHAPE), np.float32) for _ in pasts[0]]
    bias = np.full((2, seq, width + seq), MASKED, np.float32)
    ids, positions = [], []
    for row, ((cached, new), kv) in enumerate(zip(rows, pasts, strict=True)):
        for tensor, own in zip(past, kv, strict=True):
            tensor[row, : len(cached)] = own[0]
        padded = new + [0] * (seq - len(new))
        ids.append(padded)
        positions.append([len(cached) + i for i in range(seq)])
        bias[row, :, : len(cached)] = 0.0
        bias[row, :, width:] = causal(seq)
    logits, _ = run(session, ids, positions, bias, [[2], [0]], past)
    np.testing.assert_allclose(logits[0, 0], reference.logits(first)[-1], **TOLERANCE)
    np.testing.assert_allclose(logits[1, 0], reference.logits(second)[-1], **TOLERANCE)


def test_the_q4_graph_keeps_the_layer_matrices_4_bit(tiny_q4_model_dir: Path) -> None:
    import onnx

    graph = onnx.load(str(tiny_q4_model_dir / "decoder.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulNBits") == 4 * tiny_llama.N_LAYERS  # qkv, output, gate_up, down
    assert "MatMul" in ops  # attention itself


def test_unpermute_rows_inverts_llama_cpp_permutation() -> None:
    n_heads, head_dim, d_in = 3, 8, 5
    hf = np.random.default_rng(1).standard_normal((n_heads * head_dim, d_in)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    gguf = hf.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rows(gguf, n_heads), hf)
    np.testing.assert_array_equal(gguf[unpermute_index(n_heads * head_dim, n_heads)], hf)
