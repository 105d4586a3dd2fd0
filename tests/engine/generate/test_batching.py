"""Continuous batching: sequences that share decoder calls, joining and leaving mid-stream,
get exactly the tokens each would get alone (greedy and seeded sampling), a cancelled one
leaves at once without disturbing the others, and `max_batch` bounds every call."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.generate import Delta, GenerateError, Generator
from engine.generate.batching import Request, SequenceState
from engine.generate.sampling import SamplingParams
from tests.engine.generate.llama_reference import ReferenceLlama

PROMPTS = [
    "<|im_start|>user\nthe winter is long<|im_end|>\n<|im_start|>assistant\n",
    "hello there",
    "numbers 1234 and more numbers 5678, then some text to make this prompt longer",
    "on",
    "the the the the",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
]
# Different lengths, so sequences leave the batch at different steps.
MAX_TOKENS = [12, 30, 7, 25, 18, 3]


def request(i: int) -> dict[str, Any]:
    sampled = i % 2 == 1  # half greedy, half seeded sampling
    return {
        "max_tokens": MAX_TOKENS[i],
        "temperature": 0.9 if sampled else 0.0,
        "top_p": 0.9 if sampled else 1.0,
        "seed": 100 + i,
    }


async def ids(generator: Generator, i: int, started: asyncio.Event | None = None) -> list[int]:
    out: list[int] = []
    async for delta in generator.generate(PROMPTS[i], **request(i)):
        out += delta.token_ids
        if started is not None:
            started.set()
    return out


@pytest.fixture
def batched(tiny_model_dir: Path) -> Iterator[Generator]:
    generator = Generator(tiny_model_dir, max_batch=4, intra_op_threads=1)
    yield generator
    generator.close()


@pytest.fixture
def alone(tiny_model_dir: Path) -> Iterator[Generator]:
    generator = Generator(tiny_model_dir, max_batch=1, intra_op_threads=1)
    yield generator
    generator.close()


async def test_batched_sequences_joining_and_leaving_equal_each_alone(
    batched: Generator, alone: Generator
) -> None:
    expected = [await ids(alone, i) for i in range(len(PROMPTS))]
    assert set(alone.batch_sizes) == {1}
    # Three start together; the other three join once the first has produced a token.
    first_token = asyncio.Event()
    early = [asyncio.create_task(ids(batched, 0, first_token))]
    early += [asyncio.create_task(ids(batched, i)) for i in (1, 2)]
    await first_token.wait()
    late = [asyncio.create_task(ids(batched, i)) for i in (3, 4, 5)]
    results = await asyncio.gather(*early, *late)
    assert results == expected
    assert max(batched.batch_sizes) == 4  # max_batch bounds every call
    sizes = batched.batch_sizes
    assert sizes[0] < 4 and min(sizes[sizes.index(4) :]) < 4  # joined, then left


async def test_a_cancelled_sequence_leaves_without_disturbing_the_others(
    batched: Generator, alone: Generator
) -> None:
    expected = [await ids(alone, i) for i in (1, 3)]
    leaving: list[Delta] = []

    async def leave_after_two() -> None:
        async for delta in batched.generate(PROMPTS[0], max_tokens=1000):
            leaving.append(delta)
            if len(leaving) == 2:
                break

    stays = [asyncio.create_task(ids(batched, i)) for i in (1, 3)]
    await leave_after_two()
    assert await asyncio.gather(*stays) == expected
    assert sum(len(d.token_ids) for d in leaving) < 1000


async def test_task_cancellation_frees_the_slot(batched: Generator) -> None:
    started = asyncio.Event()
    blocker = asyncio.create_task(ids(batched, 1, started))
    await started.wait()
    blocker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocker
    assert len(await ids(batched, 2)) == MAX_TOKENS[2]


async def test_the_prefill_budget_admits_one_long_prompt_per_step(
    tiny_model_dir: Path, alone: Generator
) -> None:
    expected = [await ids(alone, i) for i in range(4)]
    generator = Generator(tiny_model_dir, max_batch=8, prefill_tokens=1, intra_op_threads=1)
    try:
        results = await asyncio.gather(*(ids(generator, i) for i in range(4)))
    finally:
        generator.close()
    assert results == expected
    sizes = generator.batch_sizes
    assert all(later - earlier <= 1 for earlier, later in itertools.pairwise(sizes))


def test_one_padded_call_serves_prompts_and_caches_of_different_lengths(
    tiny_generator: Generator, tiny_gguf: Path
) -> None:
    """The scheduler's own padding and masking, prefill then decode, against the reference."""
    reference = ReferenceLlama(tiny_gguf)
    scheduler = tiny_generator._scheduler
    prompts = [tiny_generator.encode(PROMPTS[i]) for i in (1, 2, 3)]
    assert len({len(p) for p in prompts}) == 3
    batch = [
        SequenceState(
            Request(p, 8, SamplingParams(), None, (), lambda _: None),
            tiny_generator.config,
            tiny_generator.stop_token_ids,
            tiny_generator.decode,
            scheduler.pool,
        )
        for p in prompts
    ]
    logits = scheduler._run(batch, prompts)
    for row, prompt in zip(logits, prompts, strict=True):
        np.testing.assert_allclose(row, reference.logits(prompt)[-1], rtol=1e-4, atol=1e-4)
    following = [[int(np.argmax(row))] for row in logits]
    logits = scheduler._run(batch, following)
    for row, prompt, token in zip(logits, prompts, following, strict=True):
        expected = reference.logits(prompt + token)[-1]
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-4)
    assert [s.cache.length for s in batch] == [len(p) + 1 for p in prompts]
    for s in batch:
        s.cache.free()
    assert_every_block_returns(tiny_generator)


async def test_a_full_kv_pool_preempts_and_recomputes_with_the_same_tokens(
    tiny_model_dir: Path, alone: Generator
) -> None:
    expected = [await ids(alone, i) for i in range(len(PROMPTS))]
    small = Generator(
        tiny_model_dir, max_batch=6, kv_cache_tokens=96, block_size=4, intra_op_threads=1
    )
    try:
        results = await asyncio.gather(*(ids(small, i) for i in range(len(PROMPTS))))
        assert results == expected
        assert small._scheduler.preemptions > 0
    finally:
        small.close()
    assert_every_block_returns(small)


async def test_a_request_larger_than_the_pool_is_refused(tiny_model_dir: Path) -> None:
    small = Generator(tiny_model_dir, kv_cache_tokens=32, block_size=4, intra_op_threads=1)
    try:
        with pytest.raises(GenerateError, match="raise kv_cache_tokens"):
            await ids_of_all(small.generate(PROMPTS[0], max_tokens=100))
    finally:
        small.close()


async def ids_of_all(stream: Any) -> list[int]:
    return [t async for d in stream for t in d.token_ids]


async def test_no_block_leaks_after_1000_random_requests_with_cancellations(
    tiny_model_dir: Path,
) -> None:
    rng = random.Random(0)
    generator = Generator(
        tiny_model_dir, max_batch=8, kv_cache_tokens=256, block_size=8, intra_op_threads=1
    )
    scheduler = generator._scheduler

    async def one() -> None:
        prompt = "".join(rng.choice("abcdef th\\n") for _ in range(rng.randint(1, 24)))
        leave_after = rng.choice([None, 0, 1, 2])
        stream = generator.generate(
            prompt, max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 1.0]), seed=1
        )
        seen = 0
        async for _ in stream:
            if leave_after is not None and seen >= leave_after:
                break
            seen += 1

    try:
        for _ in range(1000 // 50):
            await asyncio.gather(*(one() for _ in range(50)))
        generator.close()  # finishes whatever is still queued, then the pool must be whole
        assert not scheduler._waiting and not scheduler._running and not scheduler._prefilling
        assert_every_block_returns(generator)
    finally:
        generator.close()


def assert_every_block_returns(generator: Generator) -> None:
    """Blocks are free or held by the prefix cache alone; clearing the cache frees them all."""
    pool = generator._scheduler.pool
    assert pool.free_blocks + pool.cached_blocks == pool.usable_blocks
    pool.clear_prefix_cache()
    assert pool.free_blocks == pool.usable_blocks


SYSTEM = "<|im_start|>system\nYou watch the building: the doors, the heating, the air.<|im_end|>\n"


async def test_a_shared_prefix_is_computed_once_and_changes_no_token(
    tiny_model_dir: Path,
) -> None:
    questions = [f"<|im_start|>user\n{q}<|im_end|>\n" for q in ("hi", "the door", "on on")]
    kwargs: dict[str, Any] = {"max_tokens": 10, "temperature": 0.9, "seed": 4}

    async def run(generator: Generator) -> list[list[int]]:
        out = []
        for question in questions:  # one after another: each can reuse the earlier blocks
            out.append(await ids_of_all(generator.generate(SYSTEM + question, **kwargs)))
        return out

    cold = Generator(tiny_model_dir, block_size=4, prefix_cache=False, intra_op_threads=1)
    warm = Generator(tiny_model_dir, block_size=4, intra_op_threads=1)
    try:
        assert await run(warm) == await run(cold)
        shared_blocks = len(warm.encode(SYSTEM)) // 4
        assert warm._scheduler.pool.prefix_hits >= 2 * shared_blocks  # 2nd and 3rd question
        assert cold._scheduler.pool.prefix_hits == 0
    finally:
        cold.close()
        warm.close()
    assert_every_block_returns(warm)


async def test_two_replicas_split_the_rows_and_change_no_token(
    tiny_model_dir: Path, alone: Generator
) -> None:
    expected = [await ids(alone, i) for i in range(len(PROMPTS))]
    replicated = Generator(tiny_model_dir, max_batch=6, replicas=2, intra_op_threads=1)
    calls: list[int] = []
    second = replicated._sessions[1]
    run = second.run_with_ort_values

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return run(*args, **kwargs)

    second.run_with_ort_values = counted  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(*(ids(replicated, i) for i in range(len(PROMPTS))))
    finally:
        replicated.close()
    assert results == expected
    assert calls  # the second replica ran rows (prefill rows and decode halves)
    assert_every_block_returns(replicated)
