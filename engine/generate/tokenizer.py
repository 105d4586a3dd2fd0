"""The tokenizer and chat template of a GGUF model, built with `tokenizers` and `jinja2`.

Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) from the file's vocabulary and merges; the
pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` (SmolLM's splits digits one by one).
Control tokens (`<|im_start|>`, ...) are special added tokens, so they are never split.
The chat template (Jinja, as in Hugging Face's `tokenizer_config.json`) is rendered in a
sandboxed environment with the same settings transformers uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.generate.errors import ModelBuildError
from engine.generate.gguf_model import TOKEN_TYPE_CONTROL, TokenizerData

# Pre-tokenizers by tokenizer.ggml.pre; llama.cpp's names.
_DIGITS_THEN_GPT2 = ("smollm",)
_GPT2 = ("default", "gpt2", "gpt-2")


def build_tokenizer(data: TokenizerData) -> Any:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this file. Raises ModelBuildError."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if data.model != "gpt2":
        raise ModelBuildError(f"tokenizer model {data.model!r} is not supported (only gpt2 BPE)")
    vocab = {token: i for i, token in enumerate(data.tokens)}
    merges = [(left, right) for left, _, right in (m.partition(" ") for m in data.merges)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if data.pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif data.pre in _GPT2:
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ModelBuildError(f"pre-tokenizer {data.pre!r} is not supported yet")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(data.tokens[i], special=data.token_types[i] == TOKEN_TYPE_CONTROL)
            for i in data.special_token_ids()
        ]
    )
    return tokenizer


class ChatTemplate:
    """A chat template rendered with jinja2's immutable sandbox, like transformers does."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self._template = env.from_string(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise ModelBuildError(f"the chat template does not parse: {exc}") from exc
        self.source = source
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )
