"""SafePTR's window: rank candidate windows of 2-4 layers on the refusal proxy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vlmguard.export.families import FamilySpec
from vlmguard.export.guards.decoder import GuardedDecoder
from vlmguard.guards import DEFAULT_PTR_K_FRACTION, PTR_REFERENCE_TEXT, GuardSettings

from .oh_sweep import run_trunk
from .prompts import Batch, Encoded, batches, collate
from .refusal import ProxyRun, proxy_figures, rank_candidates, run_proxy

PTR_WIDTHS = (2, 3, 4)


def candidate_windows(num_layers: int, widths: tuple[int, ...] = PTR_WIDTHS) -> list[tuple]:
    """Every [start, start + width) window that fits the model."""
    return [(s, s + w) for w in widths for s in range(num_layers - w + 1)]


def reference_states(
    decoder: GuardedDecoder, embed: torch.nn.Module, tokenizer: object
) -> list[torch.Tensor]:
    """SafePTR's R for every layer: the stream entering it at the safety text's last token."""
    ids = torch.tensor(tokenizer(PTR_REFERENCE_TEXT)["input_ids"])
    with torch.no_grad():
        embeds = embed(ids[None].to(embed.weight.device))[0].cpu()
    ones = torch.ones(len(ids), dtype=torch.bool)
    item = Encoded(ids, embeds, ~ones, ~ones, ~ones)
    with torch.no_grad():
        trunk = run_trunk(decoder, collate([item]).to(embed.weight.device))
    return [state[0, -1].float() for state in trunk.entering]


def make_decoder(
    spec: FamilySpec, model: torch.nn.Module, settings: GuardSettings, reference=None
) -> GuardedDecoder:
    """A PyTorch guarded decoder over the model (it takes over the model's attention)."""
    return GuardedDecoder(spec, model, settings, reference).eval()


def ptr_guards(k_fraction: float) -> Callable[[Batch], tuple[torch.Tensor, ...]]:
    """SafePTR's prefill inputs for a batch, in `guard_input_names` order."""

    def guards(batch: Batch) -> tuple[torch.Tensor, ...]:
        return (
            torch.arange(batch.embeds.shape[1], device=batch.embeds.device),
            batch.image_rows,
            batch.instruction_rows,
            torch.tensor(k_fraction, device=batch.embeds.device),
            torch.zeros(batch.size, 0, dtype=torch.int64, device=batch.embeds.device),
        )

    return guards


def search_windows(
    spec: FamilySpec,
    model: torch.nn.Module,
    tokenizer: object,
    items: list[Encoded],
    unsafe: np.ndarray,
    held_out: np.ndarray,
    refusal_ids: list[int],
    *,
    k_fraction: float = DEFAULT_PTR_K_FRACTION,
    widths: tuple[int, ...] = PTR_WIDTHS,
    batch_size: int = 8,
    references: list[torch.Tensor] | None = None,
    on_step: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Every candidate window with its proxy figures on both parts, ranked on calibration."""
    device = next(model.parameters()).device
    plain = make_decoder(spec, model, GuardSettings())
    if references is None:
        references = reference_states(plain, spec.resolve(model, spec.embed_tokens), tokenizer)
    base: ProxyRun = run_proxy(plain, batches(items, batch_size, device), refusal_ids)
    rows = []
    for window in candidate_windows(len(plain.layers), widths):
        decoder = make_decoder(spec, model, GuardSettings(ptr_window=window), references[window[0]])
        run = run_proxy(
            decoder, batches(items, batch_size, device), refusal_ids, ptr_guards(k_fraction)
        )
        rows.append(
            {
                "window": list(window),
                "calibration": proxy_figures(run, base, unsafe, ~held_out, refusal_ids),
                "held_out": proxy_figures(run, base, unsafe, held_out, refusal_ids),
            }
        )
        on_step(1)
    return rank_candidates(rows)
