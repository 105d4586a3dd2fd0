"""A tiny random-weight Llama GGUF, written with gguf.GGUFWriter in milliseconds.

Same format features as SmolLM2's file: Q4_1 matrices, a Q8_0 token embedding, F32 norms, a
tied LM head, GQA, a byte-level BPE vocabulary with merges, control tokens and a ChatML
template. Q/K rows are stored as llama.cpp stores them (interleaved rotary pairs).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

N_LAYERS = 2
D_MODEL = 64
D_FF = 128
N_HEADS = 4
N_KV_HEADS = 2
CONTEXT = 128
ROPE_BASE = 5000.0  # unusual on purpose: the converter must read it from the file
RMS_EPS = 1e-5

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n", "Ġ w", "o r", "Ġ s", "e n", "l l"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def vocabulary() -> list[str]:
    return SPECIALS + byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tokens = vocabulary()
    head_dim = D_MODEL // N_HEADS
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def matrix(name: str, out_dim: int, in_dim: int) -> None:
        w = rng.normal(0.0, 1.0 / np.sqrt(in_dim), (out_dim, in_dim)).astype(np.float32)
        q4 = gguf.GGMLQuantizationType.Q4_1
        writer.add_tensor(name, quantize(w, q4), raw_dtype=q4)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + 0.2 * rng.standard_normal(D_MODEL)).astype(np.float32))

    # small enough that logits spread (about N(0, 1.2)): sampling then really varies
    embd = rng.normal(0.0, 0.15, (len(tokens), D_MODEL)).astype(np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("token_embd.weight", quantize(embd, q8), raw_dtype=q8)
    for i in range(N_LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", D_MODEL, D_MODEL)
        matrix(f"blk.{i}.attn_k.weight", N_KV_HEADS * head_dim, D_MODEL)
        matrix(f"blk.{i}.attn_v.weight", N_KV_HEADS * head_dim, D_MODEL)
        matrix(f"blk.{i}.attn_output.weight", D_MODEL, D_MODEL)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", D_FF, D_MODEL)
        matrix(f"blk.{i}.ffn_up.weight", D_FF, D_MODEL)
        matrix(f"blk.{i}.ffn_down.weight", D_MODEL, D_FF)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
