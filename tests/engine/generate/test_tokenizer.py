"""The tokenizer built from the GGUF vocabulary round-trips text, keeps control tokens whole,
splits digits one by one (SmolLM's pre-tokenizer), and the ChatML template renders as the file's
Jinja source says."""

from __future__ import annotations

import pytest

from engine.generate import Generator
from engine.generate.errors import ModelBuildError
from engine.generate.tokenizer import ChatTemplate
from tests.engine.generate.tiny_llama import CHATML

TEXTS = [
    "hello there, the winter is long",
    "Ünïcödé ✓ — 温度 22.5 °C",
    "  leading and trailing spaces \n\n tabs\tand newlines  ",
    "numbers 1234567890 and code: x += 42;",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny_generator: Generator, text: str) -> None:
    ids = tiny_generator.encode(text)
    assert tiny_generator.decode(ids) == text


def test_merges_apply(tiny_generator: Generator) -> None:
    vocab = tiny_generator.tokenizer.get_vocab()
    assert tiny_generator.encode(" the") == [vocab["Ġthe"]]


def test_control_tokens_are_single_ids_and_digits_split(tiny_generator: Generator) -> None:
    assert tiny_generator.encode("<|im_start|>user\n42<|im_end|>")[0] == 1
    assert tiny_generator.encode("<|im_start|>user\n42<|im_end|>")[-1] == 2
    assert len(tiny_generator.encode("4242")) == 4
    assert tiny_generator.decode([1, *tiny_generator.encode("hi"), 2]) == "hi"  # skips specials


def test_chat_template_renders_chatml(tiny_generator: Generator) -> None:
    prompt = tiny_generator.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = ChatTemplate(CHATML).render(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert without == "<|im_start|>user\nHi<|im_end|>\n"


def test_a_template_that_does_not_parse_is_a_build_error() -> None:
    with pytest.raises(ModelBuildError, match="chat template"):
        ChatTemplate("{% for m in messages %}")


def test_the_template_sandbox_refuses_attribute_escapes() -> None:
    from jinja2.exceptions import SecurityError

    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        template.render([])
