"""Per-request features on the tiny model: chunked prefill changes no token and never stops
the running decodes, priorities order admission and preemption, a deadline ends a request
with what it has, the repetition penalty matches the reference computed by hand, stop token
ids end the answer, usage counts are right, and stats() tells the scheduler's state.

Where a test must hold the scheduler at a known point it wraps the decoder call with a gate
(the real decoder still runs): the test releases the gate once its condition holds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.generate import Delta, Generator
from engine.generate.sampling import penalise
from tests.engine.generate.llama_reference import ReferenceLlama
from tests.engine.generate.test_batching import SYSTEM, assert_every_block_returns
from tests.waiting import wait_until

PROMPT = "<|im_start|>user\nthe winter is long<|im_end|>\n<|im_start|>assistant\n"
LONG = "numbers 1234 and more numbers 5678, then some text to make this prompt longer"


async def collect(generator: Generator, prompt: Any, **kwargs: Any) -> list[Delta]:
    return [delta async for delta in generator.generate(prompt, **kwargs)]


def ids_of(deltas: list[Delta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


class Gate:
    """Wraps a generator's decoder call: call number `hold_at` waits until `open()`."""

    def __init__(self, generator: Generator, hold_at: int) -> None:
        self.calls = 0
        self._hold_at = hold_at
        self._open = threading.Event()
        scheduler = generator._scheduler
        run = scheduler._run_decoder

        def gated(feeds: dict[str, Any]) -> Any:
            self.calls += 1
            if self.calls == self._hold_at:
                self._open.wait(timeout=60)
            return run(feeds)

        scheduler._run_decoder = gated

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def one_row(tiny_model_dir: Path) -> Iterator[Generator]:
    generator = Generator(tiny_model_dir, max_batch=1, intra_op_threads=1)
    yield generator
    generator.close()


async def test_chunked_prefill_changes_no_token_and_decodes_go_on_meanwhile(
    tiny_model_dir: Path, tiny_generator: Generator
) -> None:
    expected = [ids_of(await collect(tiny_generator, p, max_tokens=12)) for p in (PROMPT, LONG)]
    chunked = Generator(tiny_model_dir, prefill_tokens=3, intra_op_threads=1)
    try:
        scheduler = chunked._scheduler
        first = asyncio.create_task(collect(chunked, PROMPT, max_tokens=12))
        await wait_until(lambda: scheduler.decode_steps > 0, 30, "the first answer decoding")
        decode_steps, prefill_steps = scheduler.decode_steps, scheduler.prefill_steps
        second = ids_of(await collect(chunked, LONG, max_tokens=12))
        assert [ids_of(await first), second] == expected
        prompt_chunks = -(-len(chunked.encode(LONG)) // 3)
        assert scheduler.prefill_steps - prefill_steps >= prompt_chunks
        # the first answer kept decoding while the long prompt went in, 3 tokens a step
        assert scheduler.decode_steps - decode_steps > 1
    finally:
        chunked.close()
    assert_every_block_returns(chunked)


async def test_concurrent_prompts_sharing_a_prefix_compute_it_once(tiny_model_dir: Path) -> None:
    prompts = [f"{SYSTEM}<|im_start|>user\n{q}<|im_end|>\n" for q in ("hi", "door", "on", "air")]
    kwargs: dict[str, Any] = {"max_tokens": 8, "temperature": 0.7, "seed": 2}
    cold = Generator(tiny_model_dir, block_size=4, prefix_cache=False, intra_op_threads=1)
    warm = Generator(tiny_model_dir, block_size=4, intra_op_threads=1)
    try:
        expected = await asyncio.gather(*(collect(cold, p, **kwargs) for p in prompts))
        results = await asyncio.gather(*(collect(warm, p, **kwargs) for p in prompts))
        assert [ids_of(r) for r in results] == [ids_of(e) for e in expected]
        shared_blocks = len(warm.encode(SYSTEM)) // 4
        # all four arrived together: three waited for the first one's blocks
        assert warm._scheduler.pool.prefix_hits >= 3 * shared_blocks
        computed = warm.stats().prefill_tokens_total
        assert computed < cold.stats().prefill_tokens_total - 2 * shared_blocks * 4
    finally:
        cold.close()
        warm.close()


async def test_a_higher_priority_request_preempts_and_the_preempted_one_loses_nothing(
    one_row: Generator, tiny_generator: Generator
) -> None:
    alone = ids_of(await collect(tiny_generator, PROMPT, max_tokens=30))
    gate = Gate(one_row, hold_at=3)
    finished: list[str] = []

    async def run(name: str, prompt: str, **kwargs: Any) -> list[Delta]:
        deltas = await collect(one_row, prompt, **kwargs)
        finished.append(name)
        return deltas

    low = asyncio.create_task(run("low", PROMPT, max_tokens=30))
    await wait_until(lambda: gate.calls >= 3, 30, "the low-priority request decoding")
    high = asyncio.create_task(run("high", "hello there", max_tokens=5, priority=1))
    await wait_until(lambda: one_row._scheduler._inbox.qsize() > 0, 30, "the urgent request queued")
    gate.open()
    await asyncio.gather(low, high)
    assert finished == ["high", "low"]
    assert ids_of(low.result()) == alone  # recomputed after the preemption, same tokens
    assert one_row.stats().preemptions_total >= 1


async def test_waiting_requests_are_admitted_by_priority_then_arrival(one_row: Generator) -> None:
    gate = Gate(one_row, hold_at=2)
    finished: list[str] = []

    async def run(name: str, priority: int) -> None:
        await collect(one_row, PROMPT, max_tokens=3, priority=priority)
        finished.append(name)

    tasks = [asyncio.create_task(run("blocker", 9))]
    await wait_until(lambda: gate.calls >= 2, 30, "the blocker running")
    for name, priority in (("b", 0), ("c", 5), ("d", 0), ("e", -1)):
        tasks.append(asyncio.create_task(run(name, priority)))
    await wait_until(lambda: one_row._scheduler._inbox.qsize() == 4, 30, "four requests queued")
    gate.open()
    await asyncio.gather(*tasks)
    assert finished == ["blocker", "c", "b", "d", "e"]


async def test_a_deadline_ends_a_waiting_request_at_once(one_row: Generator) -> None:
    deltas = await collect(one_row, PROMPT, max_tokens=5, deadline_s=1e-6)
    assert [d.finish_reason for d in deltas] == ["deadline"]
    assert ids_of(deltas) == [] and deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == 0
    assert deltas[-1].usage.prompt_tokens == len(one_row.encode(PROMPT))


async def test_a_deadline_mid_answer_keeps_the_tokens_so_far(
    one_row: Generator, tiny_generator: Generator
) -> None:
    alone = ids_of(await collect(tiny_generator, PROMPT, max_tokens=40))
    gate = Gate(one_row, hold_at=3)
    started = time.monotonic()
    task = asyncio.create_task(collect(one_row, PROMPT, max_tokens=40, deadline_s=0.3))
    await wait_until(lambda: gate.calls >= 3, 30, "the third decoder call")
    await wait_until(lambda: time.monotonic() > started + 0.35, 30, "the deadline passing")
    gate.open()
    deltas = await task
    assert deltas[-1].finish_reason == "deadline"
    assert ids_of(deltas) == alone[:3]  # prefill + 2 decodes, the last one let through late
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
    assert "".join(d.text for d in deltas) == one_row.decode(alone[:3])
    assert_every_block_returns(one_row)


async def test_the_repetition_penalty_matches_the_reference_applied_by_hand(
    tiny_generator: Generator, tiny_gguf: Path
) -> None:
    reference = ReferenceLlama(tiny_gguf)
    prompt = tiny_generator.encode("the the the the")
    vocab = tiny_generator.config.vocab_size
    for penalty in (1.0, 1.8):
        expected: list[int] = []
        for _ in range(10):
            logits = reference.logits(prompt + expected)[-1].astype(np.float32)
            seen = np.zeros(vocab, np.bool_)
            seen[prompt + expected] = True
            penalise(logits, seen, penalty)
            token = int(np.argmax(logits))
            if token in tiny_generator.stop_token_ids:
                break
            expected.append(token)
        deltas = await collect(
            tiny_generator, "the the the the", max_tokens=10, repetition_penalty=penalty
        )
        assert ids_of(deltas) == expected, penalty
    plain = ids_of(await collect(tiny_generator, "the the the the", max_tokens=10))
    assert plain != expected  # the penalty changed the answer


def test_penalise_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, -2.0, 3.0, -1.0], np.float32)
    penalise(logits, np.array([True, True, False, False]), 2.0)
    np.testing.assert_array_equal(logits, [1.0, -4.0, 3.0, -1.0])


async def test_stop_token_ids_end_the_answer_and_usage_counts_it(
    tiny_generator: Generator,
) -> None:
    full = ids_of(await collect(tiny_generator, PROMPT, max_tokens=12))
    stop = full[4]
    before = full[: full.index(stop)]
    deltas = await collect(tiny_generator, PROMPT, max_tokens=12, stop_token_ids=[stop])
    assert ids_of(deltas) == before
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == len(before)
    assert deltas[-1].usage.prompt_tokens == len(tiny_generator.encode(PROMPT))
    with pytest.raises(ValueError, match="stop_token_ids"):
        await collect(tiny_generator, PROMPT, stop_token_ids=[10**9])


async def test_breaking_the_loop_frees_the_blocks_by_the_next_step(
    tiny_generator: Generator,
) -> None:
    scheduler = tiny_generator._scheduler
    usable = scheduler.pool.usable_blocks
    stream = tiny_generator.generate(PROMPT, max_tokens=100)
    async for _ in stream:
        break
    seen = scheduler.counts  # the state after some step while the request was admitted
    await stream.aclose()  # what the event loop does soon after a `break` anyway
    await wait_until(
        lambda: scheduler.counts is not seen and scheduler.counts == (0, 0, usable),
        30,
        "a step after the request left",
    )
    assert tiny_generator.stats().kv_blocks_free == usable
    assert_every_block_returns(tiny_generator)


async def test_stats_count_tokens_latencies_and_blocks(tiny_generator: Generator) -> None:
    empty = tiny_generator.stats()
    assert (empty.running, empty.waiting, empty.ttft_p99_s, empty.decode_tokens_total) == (
        0,
        0,
        0.0,
        0,
    )
    answers = await asyncio.gather(
        *(collect(tiny_generator, p, max_tokens=6) for p in (PROMPT, LONG, "hello"))
    )
    await wait_until(lambda: tiny_generator.stats().running == 0, 30, "the step after the last")
    stats = tiny_generator.stats()
    prompt_tokens = sum(d[-1].usage.prompt_tokens for d in answers if d[-1].usage)
    completion = sum(d[-1].usage.completion_tokens for d in answers if d[-1].usage)
    assert completion == sum(len(ids_of(d)) for d in answers)
    assert stats.prefill_tokens_total == prompt_tokens  # no shared prefix among these
    assert stats.decode_tokens_total >= completion - len(answers)
    assert 0 < stats.ttft_p50_s <= stats.ttft_p99_s
    assert 0 < stats.inter_token_p50_s <= stats.inter_token_p99_s
    pool = tiny_generator._scheduler.pool
    assert stats.kv_blocks_used + stats.kv_blocks_free == pool.usable_blocks
    assert (stats.running, stats.waiting) == (0, 0)
    with pytest.raises(AttributeError):
        stats.running = 3  # type: ignore[misc]


async def test_ignore_eos_generates_past_the_model_stop_token(tiny_generator: Generator) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 40, "temperature": 1.0}
    for seed in range(200):  # a sampled answer the model itself ends early
        stopped = await collect(tiny_generator, "hello", seed=seed, **kwargs)
        if stopped[-1].finish_reason == "stop":
            break
    else:
        pytest.fail("no seed made the tiny model stop within 40 tokens")
    going = await collect(tiny_generator, "hello", seed=seed, ignore_eos=True, **kwargs)
    assert going[-1].finish_reason == "length" and len(ids_of(going)) == 40
    assert ids_of(going)[: len(ids_of(stopped))] == ids_of(stopped)
