"""A straightforward numpy Llama forward pass over a GGUF file, as llama.cpp computes it.

Deliberately independent of engine.generate: it reads the file with GGUFReader itself, applies
rotary embeddings to *adjacent pairs* on the stored (permuted) Q/K weights, repeats KV heads
for GQA, and runs the whole sequence at once in float64. The oracle for the ONNX decoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class ReferenceLlama:
    def __init__(self, path: Path) -> None:
        reader = GGUFReader(path)

        def meta(key: str) -> float:
            return float(reader.fields[f"llama.{key}"].contents())

        self.n_layers = int(meta("block_count"))
        self.n_heads = int(meta("attention.head_count"))
        self.n_kv = int(meta("attention.head_count_kv"))
        self.rope_base = meta("rope.freq_base")
        self.eps = meta("attention.layer_norm_rms_epsilon")
        self.w: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            shape = tuple(reversed([int(n) for n in t.shape]))
            self.w[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: [seq, heads, head_dim]; rotate pairs (x[2i], x[2i+1]) by pos * base^(-2i/d)."""
        head_dim = x.shape[-1]
        inv_freq = self.rope_base ** (-np.arange(0, head_dim, 2) / head_dim)
        angle = positions[:, None, None] * inv_freq[None, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
        out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
        return out

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[seq, vocab] logits of every position of one causal sequence from position 0."""
        w = self.w
        seq = len(token_ids)
        positions = np.arange(seq, dtype=np.float64)
        h = w["token_embd.weight"][token_ids]
        causal = np.triu(np.full((seq, seq), -np.inf), k=1)
        for i in range(self.n_layers):
            x = self._norm(h, w[f"blk.{i}.attn_norm.weight"])
            q = (x @ w[f"blk.{i}.attn_q.weight"].T).reshape(seq, self.n_heads, -1)
            k = (x @ w[f"blk.{i}.attn_k.weight"].T).reshape(seq, self.n_kv, -1)
            v = (x @ w[f"blk.{i}.attn_v.weight"].T).reshape(seq, self.n_kv, -1)
            q, k = self._rope(q, positions), self._rope(k, positions)
            repeat = self.n_heads // self.n_kv
            k, v = np.repeat(k, repeat, axis=1), np.repeat(v, repeat, axis=1)
            heads = []
            for head in range(self.n_heads):
                scores = q[:, head] @ k[:, head].T / np.sqrt(q.shape[-1]) + causal
                p = np.exp(scores - scores.max(axis=-1, keepdims=True))
                heads.append((p / p.sum(axis=-1, keepdims=True)) @ v[:, head])
            h = h + np.concatenate(heads, axis=-1) @ w[f"blk.{i}.attn_output.weight"].T
            x = self._norm(h, w[f"blk.{i}.ffn_norm.weight"])
            gate = x @ w[f"blk.{i}.ffn_gate.weight"].T
            up = x @ w[f"blk.{i}.ffn_up.weight"].T
            h = h + (gate / (1 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down.weight"].T
        h = self._norm(h, w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return h @ head.T
