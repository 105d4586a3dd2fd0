"""Read a Llama-architecture GGUF file into fp32 numpy weights, hyper-parameters and tokenizer data.

Tensors are dequantised with `gguf.quants.dequantize` and returned in (out, in) layout, exactly
as stored in the file (y = x @ W.T). Q and K projections keep llama.cpp's row permutation
(GGUF rotary pairs are *adjacent* elements); `engine.generate.onnx_export` undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from engine.generate.errors import ModelBuildError

F32 = NDArray[np.float32]

SUPPORTED_ARCHITECTURES = ("llama",)
# token_type values in tokenizer.ggml.token_type (llama.cpp's llama_token_type)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters of a Llama decoder, as the GGUF metadata states them."""

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    rope_freq_base: float
    rms_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LlamaConfig:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TokenizerData:
    """Everything the GGUF file says about its tokenizer and chat format."""

    model: str  # "gpt2" = byte-level BPE
    pre: str
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool
    chat_template: str | None

    def special_token_ids(self) -> list[int]:
        kinds = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        return [i for i, kind in enumerate(self.token_types) if kind in kinds]


Q4_BLOCK = 32  # elements per Q4_1 block


@dataclass(frozen=True)
class BlockQ4:
    """A Q4_1 matrix (out, in) repacked for ONNX Runtime's MatMulNBits: per block of 32
    inputs, value = (code - zero_point) * scale. Q4_1 stores value = d * code + m, so
    scale = d and zero_point = -m / d (a block with d = 0 holds m everywhere: code 1, scale m).
    `packed` holds two codes per byte, element 2j in the low nibble, 2j+1 in the high one."""

    packed: NDArray[np.uint8]  # [out, in / 32, 16]
    scales: F32  # [out, in / 32]
    zero_points: F32  # [out, in / 32]

    @classmethod
    def from_q4_1(cls, raw: NDArray[np.uint8], out_dim: int, in_dim: int) -> BlockQ4:
        blocks = raw.reshape(out_dim, in_dim // Q4_BLOCK, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        low_high = blocks[..., 4:]  # byte j: element j (low nibble), element j + 16 (high)
        codes = np.concatenate([low_high & 0x0F, low_high >> 4], axis=-1)
        flat = d == 0
        codes[flat] = 1
        scales = np.where(flat, m, d).astype(np.float32)
        zero_points = np.where(flat, 0.0, -m / np.where(flat, 1.0, d)).astype(np.float32)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        return cls(packed, scales, zero_points)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * Q4_BLOCK

    def take_rows(self, index: NDArray[np.int64]) -> BlockQ4:
        return BlockQ4(self.packed[index], self.scales[index], self.zero_points[index])

    def scaled(self, factor: float) -> BlockQ4:
        return BlockQ4(self.packed, self.scales * np.float32(factor), self.zero_points)

    @classmethod
    def stack(cls, parts: list[BlockQ4]) -> BlockQ4:
        """The matrices one above the other (outputs concatenated)."""
        return cls(
            np.concatenate([p.packed for p in parts]),
            np.concatenate([p.scales for p in parts]),
            np.concatenate([p.zero_points for p in parts]),
        )

    def block_mins(self) -> F32:
        """Per block, the value of code 0: value = code * scale + min (min = -zero_point * scale)."""
        return (-self.zero_points * self.scales).astype(np.float32)

    def dequantize(self) -> F32:
        codes = np.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(
            *self.scales.shape, Q4_BLOCK
        )
        values = (codes - self.zero_points[..., None]) * self.scales[..., None]
        return values.reshape(self.shape).astype(np.float32)


@dataclass
class LlamaWeights:
    """fp32 weights in (out, in) layout; `output` is None when the head is tied to `token_embd`.
    `q4` holds the Q4_1 layer matrices repacked (by tensor name, "blk.0.attn_q"), when asked."""

    config: LlamaConfig
    tokenizer: TokenizerData
    token_embd: F32
    output_norm: F32
    output: F32 | None
    layers: list[dict[str, F32]] = field(default_factory=list)
    name: str = ""
    q4: dict[str, BlockQ4] = field(default_factory=dict)


LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field_ = reader.fields.get(key)
    if field_ is None:
        return default
    return field_.contents()


def _required(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelBuildError(f"GGUF metadata has no {key!r}: not a complete Llama model file")
    return value


def read_gguf(path: Path, *, keep_q4: bool = False) -> LlamaWeights:
    """Read and dequantise every tensor of a Llama GGUF file; with `keep_q4`, also keep each
    Q4_1 layer matrix repacked as a `BlockQ4`. Raises `ModelBuildError`."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ModelBuildError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = _required(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelBuildError(
            f"{path}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensors: dict[str, F32] = {}
    q4: dict[str, BlockQ4] = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists shapes innermost first; numpy's is outermost first.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        is_layer = tensor.name.startswith("blk.") and len(shape) == 2
        if keep_q4 and is_layer and tensor.tensor_type == GGMLQuantizationType.Q4_1:
            q4[tensor.name.removesuffix(".weight")] = BlockQ4.from_q4_1(
                np.asarray(tensor.data), *shape
            )

    n_heads = int(_required(reader, f"{arch}.attention.head_count"))
    token_embd = tensors["token_embd.weight"]
    config = LlamaConfig(
        n_layers=int(_required(reader, f"{arch}.block_count")),
        d_model=int(_required(reader, f"{arch}.embedding_length")),
        d_ff=int(_required(reader, f"{arch}.feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        vocab_size=int(_field(reader, f"{arch}.vocab_size", token_embd.shape[0])),
        context_length=int(_required(reader, f"{arch}.context_length")),
        rope_freq_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
    )
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelBuildError(f"{path}: rope scaling {scaling!r} is not supported yet")
    tokenizer = TokenizerData(
        model=str(_required(reader, "tokenizer.ggml.model")),
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        tokens=list(_required(reader, "tokenizer.ggml.tokens")),
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type", [])],
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    try:
        layers = [
            {name: tensors[f"blk.{i}.{name}.weight"] for name in LAYER_TENSORS}
            for i in range(config.n_layers)
        ]
        output_norm = tensors["output_norm.weight"]
    except KeyError as exc:
        raise ModelBuildError(f"{path}: tensor {exc.args[0]} is missing") from exc
    return LlamaWeights(
        config=config,
        tokenizer=tokenizer,
        token_embd=token_embd,
        output_norm=output_norm,
        output=tensors.get("output.weight"),
        layers=layers,
        name=str(_field(reader, "general.name", path.stem)),
        q4=q4,
    )
