"""Sampling: greedy is argmax, filters narrow the choice, a seed reproduces the draw."""

from __future__ import annotations

import numpy as np
import pytest

from engine.generate.sampling import SamplingParams, sample

LOGITS = np.array([0.5, 3.0, 2.9, -1.0, 2.8, 0.0], np.float32)


def draws(params: SamplingParams, seed: int, n: int = 200) -> list[int]:
    rng = np.random.default_rng(seed)
    return [sample(LOGITS, params, rng) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    assert set(draws(SamplingParams(), seed=0)) == {1}


def test_top_k_1_is_argmax_at_any_temperature() -> None:
    assert set(draws(SamplingParams(temperature=5.0, top_k=1), seed=0)) == {1}


def test_top_k_keeps_the_k_most_likely() -> None:
    assert set(draws(SamplingParams(temperature=1.0, top_k=3), seed=0)) == {1, 2, 4}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # the three near-equal tokens hold ~87% of the mass at temperature 1
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5), seed=0)) <= {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8), seed=0)) == {1, 2, 4}


def test_a_seed_reproduces_and_another_seed_differs() -> None:
    params = SamplingParams(temperature=1.5)
    assert draws(params, seed=7) == draws(params, seed=7)
    assert draws(params, seed=7) != draws(params, seed=8)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}]
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
