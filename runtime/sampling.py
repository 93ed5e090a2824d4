"""Next-token choice: greedy at temperature 0, else temperature, top-k and top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmguard.errors import UsageError


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        """Refuse settings no sampler can honour."""
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be >= 1, not {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], not {self.top_p}")


def pick_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One token per row of logits [B, V]."""
    logits = logits.astype(np.float64)
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -sampling.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < sampling.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])
