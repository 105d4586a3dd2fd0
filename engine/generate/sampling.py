"""Choosing the next token from logits: repetition penalty, then greedy or temperature with
top-k and top-p (nucleus), seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 disable those filters;
    repetition_penalty > 1 makes every token already in the prompt or the answer less likely
    (its logit divided by the penalty when positive, multiplied when negative, as in the CTRL
    paper and Hugging Face), 1.0 disables it."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def penalise(logits: NDArray[np.float32], seen: NDArray[np.bool_], penalty: float) -> None:
    """Apply the repetition penalty in place to the logits of the `seen` tokens."""
    chosen = logits[seen]
    logits[seen] = np.where(chosen > 0, chosen / penalty, chosen * penalty)


def sample(
    logits: NDArray[np.float32],
    params: SamplingParams,
    rng: np.random.Generator,
    seen: NDArray[np.bool_] | None = None,
) -> int:
    """One token id from a [vocab] row of logits; `seen` marks the tokens of the prompt and the
    answer so far (for the repetition penalty; logits are then not modified, a copy is)."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = logits.copy()
        penalise(logits, seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.size:
        candidates = np.argpartition(scaled, -params.top_k)[-params.top_k :]
    else:
        candidates = np.arange(scaled.size)
    # Highest first; ties broken by token id so a seed always picks the same token.
    order = candidates[np.lexsort((candidates, -scaled[candidates]))]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(order.size, p=probs)])
