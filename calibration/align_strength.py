"""GuardAlign's calibration strength: gamma and layer range, ranked on the refusal proxy.

Samples carry the runtime's safety prefix (as when the detector flags an input); the baseline
is the same prompt with gamma 0, so a candidate is judged on what the attention boost adds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vlmguard.export.families import FamilySpec
from vlmguard.guards import GuardSettings

from .prompts import Batch, Encoded, batches
from .ptr_window import make_decoder
from .refusal import proxy_figures, rank_candidates, run_proxy

ALIGN_GAMMAS = (0.1, 0.3, 0.5, 1.0)  # [ours] candidate strengths


def layer_ranges(num_layers: int) -> dict[str, tuple[int, int]]:
    """Candidate [start, end) layer ranges: each third and the middle half."""
    third = max(1, num_layers // 3)
    ranges = {
        "first third": (0, third),
        "middle third": (third, max(third + 1, (2 * num_layers) // 3)),
        "last third": (max(0, num_layers - third), num_layers),
        "middle half": (num_layers // 4, max(num_layers // 4 + 1, (3 * num_layers) // 4)),
    }
    return ranges


def gamma_vector(num_layers: int, span: tuple[int, int], gamma: float) -> list[float]:
    """Per-layer strengths: gamma inside the span, 0 elsewhere."""
    return [gamma if span[0] <= i < span[1] else 0.0 for i in range(num_layers)]


def align_guards(gamma: list[float]) -> Callable[[Batch], tuple[torch.Tensor, ...]]:
    """GuardAlign's prefill inputs for a batch, in `guard_input_names` order."""
    vector = torch.tensor(gamma, dtype=torch.float32)

    def guards(batch: Batch) -> tuple[torch.Tensor, ...]:
        return (vector.to(batch.embeds.device), batch.prefix_rows)

    return guards


def search_strength(
    spec: FamilySpec,
    model: torch.nn.Module,
    items: list[Encoded],
    unsafe: np.ndarray,
    held_out: np.ndarray,
    refusal_ids: list[int],
    *,
    gammas: tuple[float, ...] = ALIGN_GAMMAS,
    batch_size: int = 8,
    on_step: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Every (range, gamma) with its proxy figures on both parts, ranked on the calibration part."""
    device = next(model.parameters()).device
    decoder = make_decoder(spec, model, GuardSettings(align=True))
    layers = len(decoder.layers)
    base = run_proxy(
        decoder, batches(items, batch_size, device), refusal_ids, align_guards([0.0] * layers)
    )
    rows = []
    for name, span in layer_ranges(layers).items():
        for gamma in gammas:
            vector = gamma_vector(layers, span, gamma)
            run = run_proxy(
                decoder, batches(items, batch_size, device), refusal_ids, align_guards(vector)
            )
            rows.append(
                {
                    "range": name,
                    "layers": list(span),
                    "gamma": gamma,
                    "align_gamma": vector,
                    "calibration": proxy_figures(run, base, unsafe, ~held_out, refusal_ids),
                    "held_out": proxy_figures(run, base, unsafe, held_out, refusal_ids),
                }
            )
            on_step(1)
    return rank_candidates(rows)
