"""JSON mode: the prefix validator accepts exactly the prefixes of JSON objects and arrays
(checked against the standard library's parser), and constrained generation on the tiny
random model (which never writes JSON by itself) returns a document `json.loads` accepts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.generate import Generator
from engine.generate.json_constraint import JsonPrefix, choose_token

DOCUMENTS = [
    '{"a": 1, "b": [true, false, null], "c": {"d": "x\\"y\\u00e9"}}',
    "[1, -2.5, 3e10, 0.25E-3, -0, []]",
    ' \n{"empty": {}, "list": [ ], "s": ""}',
    '[{"k": "v"}, "naïve", 12345678901234567890]',
]
INVALID = ['{"a" 1}', "[1,]", "[01]", '{"a": tru}', "{}}", "[1 2]",
           '{"a": "\x01"}', "[-]", "[1.]", '{"a": 1,}', "nul", "[1e]"]  # fmt: skip


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_prefix_of_a_document_is_valid_and_only_the_whole_is_complete(
    document: str,
) -> None:
    json.loads(document)
    state: JsonPrefix | None = JsonPrefix()
    for i, char in enumerate(document):
        assert state is not None and not state.complete, document[:i]
        state = state.feed(char)
    assert state is not None and state.complete
    assert state.feed("x") is None and state.feed(" ") is not None


@pytest.mark.parametrize("text", INVALID)
def test_text_that_no_document_starts_with_is_refused(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    state = JsonPrefix().feed(text)
    assert state is None or not state.complete


@pytest.mark.parametrize("text", ["1", '"a string"', "true", "null"])
def test_json_mode_wants_an_object_or_an_array_at_the_top(text: str) -> None:
    json.loads(text)
    assert JsonPrefix().feed(text) is None


def test_choose_token_takes_the_best_valid_token() -> None:
    texts = {0: "hello", 1: "{", 2: " [", 3: "}"}
    logits = np.array([5.0, 1.0, 3.0, 4.0], np.float32)
    token, state = choose_token(logits, lambda row: int(np.argmax(row)), JsonPrefix(), texts.get)
    assert token == 2 and not state.complete  # 0 and 3 cannot start a document


async def test_json_mode_makes_the_tiny_model_write_json(tiny_generator: Generator) -> None:
    for seed, temperature in ((None, 0.0), (1, 1.0), (2, 1.0)):
        deltas = [
            d
            async for d in tiny_generator.generate(
                "write json", max_tokens=100, json_mode=True, temperature=temperature, seed=seed
            )
        ]
        text = "".join(d.text for d in deltas)
        if deltas[-1].finish_reason == "stop":
            assert isinstance(json.loads(text), dict | list), text
        else:  # cut by max_tokens: still a valid prefix
            assert deltas[-1].finish_reason == "length"
            assert JsonPrefix().feed(text) is not None, text
    plain = "".join([d.text async for d in tiny_generator.generate("write json", max_tokens=30)])
    assert JsonPrefix().feed(plain) is None  # without the constraint it is not JSON
