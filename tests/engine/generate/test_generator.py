"""Generator on the tiny random model: greedy tokens are the reference model's argmax tokens,
deltas add up to the decoded answer, stop strings and max_tokens end it with the right reason,
a seed reproduces a sampled answer, and leaving the loop early frees the worker."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.generate import Delta, GenerateError, Generator
from tests.engine.generate import tiny_llama
from tests.engine.generate.llama_reference import ReferenceLlama

PROMPT = "<|im_start|>user\nthe winter is long<|im_end|>\n<|im_start|>assistant\n"


async def collect(generator: Generator, prompt: Any, **kwargs: Any) -> list[Delta]:
    return [delta async for delta in generator.generate(prompt, **kwargs)]


def ids_of(deltas: list[Delta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def text_of(deltas: list[Delta]) -> str:
    return "".join(delta.text for delta in deltas)


async def test_greedy_tokens_are_the_reference_argmax(
    tiny_generator: Generator, tiny_gguf: Path
) -> None:
    reference = ReferenceLlama(tiny_gguf)
    for prompt in (PROMPT, "hello there, 42"):
        deltas = await collect(tiny_generator, prompt, max_tokens=8)
        ids = tiny_generator.encode(prompt)
        expected: list[int] = []
        for _ in range(8):
            token = int(np.argmax(reference.logits(ids + expected)[-1]))
            if token in tiny_generator.stop_token_ids:
                break
            expected.append(token)
        assert ids_of(deltas) == expected
        assert deltas[-1].finish_reason == ("length" if len(expected) == 8 else "stop")


async def test_deltas_add_up_to_the_decoded_answer_and_max_tokens_ends_it(
    tiny_generator: Generator,
) -> None:
    deltas = await collect(tiny_generator, PROMPT, max_tokens=20, temperature=1.0, seed=3)
    assert len(ids_of(deltas)) == 20
    assert text_of(deltas) == tiny_generator.decode(ids_of(deltas))
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"


async def test_messages_are_rendered_with_the_chat_template(tiny_generator: Generator) -> None:
    messages = [{"role": "user", "content": "the winter is long"}]
    from_messages = await collect(tiny_generator, messages, max_tokens=6, temperature=0.8, seed=1)
    from_text = await collect(tiny_generator, PROMPT, max_tokens=6, temperature=0.8, seed=1)
    assert ids_of(from_messages) == ids_of(from_text)


async def test_a_seed_reproduces_a_sampled_answer(tiny_generator: Generator) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    first = await collect(tiny_generator, PROMPT, seed=11, **kwargs)
    again = await collect(tiny_generator, PROMPT, seed=11, **kwargs)
    other = await collect(tiny_generator, PROMPT, seed=12, **kwargs)
    assert ids_of(first) == ids_of(again)
    assert ids_of(first) != ids_of(other)


async def test_a_stop_string_ends_the_answer_before_it(tiny_generator: Generator) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 40, "temperature": 1.0, "seed": 5}
    full = text_of(await collect(tiny_generator, PROMPT, **kwargs))
    start = next(i for i in range(6, len(full) - 2) if full[i : i + 2].isprintable())
    stop = full[start : start + 2]
    deltas = await collect(tiny_generator, PROMPT, stop=["never-there", stop], **kwargs)
    assert text_of(deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


async def test_the_context_length_ends_the_answer(tiny_generator: Generator) -> None:
    prompt_ids = tiny_generator.encode("hello there " * 20)[: tiny_llama.CONTEXT - 5]
    prompt = tiny_generator.decode(prompt_ids)
    deltas = await collect(tiny_generator, prompt, max_tokens=50, temperature=1.0, seed=0)
    assert len(ids_of(deltas)) <= 5
    assert deltas[-1].finish_reason in ("length", "stop")


async def test_bad_requests_are_refused_before_running(tiny_generator: Generator) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        await collect(tiny_generator, PROMPT, max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        await collect(tiny_generator, "")
    with pytest.raises(GenerateError, match="context holds 128"):
        await collect(tiny_generator, "hello there " * 100)


async def test_leaving_the_loop_early_frees_the_worker_for_the_next_request(
    tiny_generator: Generator,
) -> None:
    async for _ in tiny_generator.generate(PROMPT, max_tokens=10_000, temperature=1.0, seed=2):
        break
    # The abandoned request stops at its next token; this one runs after it, in full.
    deltas = await asyncio.wait_for(collect(tiny_generator, PROMPT, max_tokens=5), 30)
    assert len(ids_of(deltas)) == 5


async def test_the_decoder_runs_off_the_event_loop_thread(tiny_generator: Generator) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    run = tiny_generator._session.run_with_ort_values

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident())
        return run(*args, **kwargs)

    tiny_generator._session.run_with_ort_values = spy  # type: ignore[method-assign]
    await collect(tiny_generator, PROMPT, max_tokens=3)
    assert seen and loop_thread not in seen


async def test_a_closed_generator_refuses_new_requests(tiny_model_dir: Path) -> None:
    generator = Generator(tiny_model_dir, intra_op_threads=1)
    generator.close()
    with pytest.raises(GenerateError, match="closed"):
        await collect(generator, PROMPT, max_tokens=2)


async def test_a_decoder_failure_ends_the_request_with_an_error(
    tiny_generator: Generator,
) -> None:
    """ONNX Runtime refuses a token id outside the vocabulary: the caller gets the error and
    the generator keeps serving."""
    real_encode = tiny_generator.encode
    tiny_generator.encode = lambda text: [10_000]  # type: ignore[method-assign]
    with pytest.raises(GenerateError, match="generation failed"):
        await collect(tiny_generator, "x", max_tokens=2)
    tiny_generator.encode = real_encode  # type: ignore[method-assign]
    assert len(ids_of(await collect(tiny_generator, PROMPT, max_tokens=3))) == 3


@pytest.mark.parametrize("seed", range(6))
async def test_incremental_text_equals_decoding_the_whole_answer(
    tiny_generator: Generator, seed: int
) -> None:
    """Random byte-level tokens split UTF-8 characters and make invalid sequences: the text
    handed out piece by piece is still exactly the whole answer decoded at once."""
    deltas = await collect(tiny_generator, "é ✓ 温", max_tokens=60, temperature=1.5, seed=seed)
    assert text_of(deltas) == tiny_generator.decode(ids_of(deltas))
