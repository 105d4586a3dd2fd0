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


@dataclass
class LlamaWeights:
    """fp32 weights in (out, in) layout; `output` is None when the head is tied to `token_embd`."""

    config: LlamaConfig
    tokenizer: TokenizerData
    token_embd: F32
    output_norm: F32
    output: F32 | None
    layers: list[dict[str, F32]] = field(default_factory=list)
    name: str = ""


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


def read_gguf(path: Path) -> LlamaWeights:
    """Read and dequantise every tensor of a Llama GGUF file. Raises `ModelBuildError`."""
    from gguf import GGUFReader
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
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists shapes innermost first; numpy's is outermost first.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)

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
    )
