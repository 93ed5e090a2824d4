"""Oh Defense's head sweep: the deflection angle of every (layer, head), batched, and the pick.

For a batch, the trunk runs once and keeps the residual stream entering every layer; then, per
layer l, the remaining layers run once over B x H rows, each row with a different head of layer
l muted (query scaled by 1e-5). The angle is between final-norm states at the last prompt
position, as the exported graph computes it (`deflection_degrees`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from vlmguard.export.guards.attention import AttentionGuard
from vlmguard.export.guards.decoder import GuardedDecoder, allowed_keys
from vlmguard.export.guards.oh import deflection_degrees

from .prompts import Batch
from .thresholds import kde_crossing

SAFE_PERCENTILE = 80.0  # [code] keep heads whose mean safe angle is below this percentile


@dataclass
class Trunk:
    """A batch's plain pass: residual streams entering each layer, and the final last state."""

    entering: list[torch.Tensor]
    final_last: torch.Tensor  # [B, D]
    rope: tuple[torch.Tensor, torch.Tensor]
    allowed: dict[int | None, torch.Tensor]


def run_trunk(decoder: GuardedDecoder, batch: Batch) -> Trunk:
    """Run every layer unguarded, keeping the stream entering each one."""
    seq = batch.embeds.shape[1]
    rope = decoder.rotary(batch.embeds, batch.position_ids)
    allowed = {w: allowed_keys(batch.attention_mask, 0, seq, w) for w in set(decoder.windows)}
    hidden, entering = batch.embeds, []
    for i in range(len(decoder.layers)):
        entering.append(hidden)
        hidden = decoder._layer(i, hidden, allowed[decoder.windows[i]], rope, None, None)
    return Trunk(entering, decoder.norm(hidden)[:, -1], rope, allowed)


def hidden_device(trunk: Trunk) -> torch.device:
    """The device the batch runs on."""
    return trunk.final_last.device


def layer_angles(decoder: GuardedDecoder, trunk: Trunk, layer: int, heads: int) -> torch.Tensor:
    """Angles [B, H] with each head of `layer` muted in its own row, from the layer to the end."""
    batch = trunk.final_last.shape[0]

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(heads, dim=0)

    rope = (rows(trunk.rope[0]), rows(trunk.rope[1]))
    allowed = {w: rows(m) for w, m in trunk.allowed.items()}
    muted = AttentionGuard(
        muted_head=torch.arange(heads, device=hidden_device(trunk)).repeat(batch)
    )
    hidden = rows(trunk.entering[layer])
    for i in range(layer, len(decoder.layers)):
        guard = muted if i == layer else None
        hidden = decoder._layer(i, hidden, allowed[decoder.windows[i]], rope, None, guard)
    final = decoder.norm(hidden)[:, -1].reshape(batch, heads, -1)
    return deflection_degrees(trunk.final_last[:, None], final)


def sweep_angles(
    decoder: GuardedDecoder,
    batches: Iterable[Batch],
    heads: int,
    on_step: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """Angles [N, layers, heads] (degrees) for every sample, layer and head."""
    out = []
    with torch.no_grad():
        for batch in batches:
            trunk = run_trunk(decoder, batch)
            per_layer = []
            for layer in range(len(decoder.layers)):
                per_layer.append(layer_angles(decoder, trunk, layer, heads))
                on_step(1)
            out.append(torch.stack(per_layer, dim=1).double().cpu().numpy())
    return np.concatenate(out, axis=0)


@dataclass(frozen=True)
class HeadChoice:
    """The chosen head, its threshold and the ranking behind it."""

    layer: int
    head: int
    threshold: float
    table: list[dict]  # ranked candidates (top first)
    gap: np.ndarray  # [layers, heads] mean unsafe - mean safe angle
    safe_cut: float  # the safe-angle percentile heads had to stay below

    def to_dict(self, top: int = 10) -> dict:
        """The JSON form, with the top of the ranking."""
        return {
            "layer": self.layer,
            "head": self.head,
            "threshold_degrees": self.threshold,
            "safe_percentile_cut": self.safe_cut,
            "top": self.table[:top],
        }


def select_head(
    angles: np.ndarray, unsafe: np.ndarray, percentile: float = SAFE_PERCENTILE
) -> HeadChoice:
    """Oh Defense's head rule (docs/guards.md): below the safe percentile, best unsafe - safe."""
    unsafe = np.asarray(unsafe, dtype=bool)
    safe_mean = angles[~unsafe].mean(axis=0)
    unsafe_mean = angles[unsafe].mean(axis=0)
    gap = unsafe_mean - safe_mean
    cut = float(np.percentile(safe_mean, percentile))
    kept = safe_mean < cut
    if not kept.any():  # every head ties: keep them all rather than none
        kept = np.ones_like(kept)
    order = sorted(zip(*np.nonzero(kept), strict=True), key=lambda lh: (-gap[lh], lh))
    table = [
        {
            "layer": int(layer),
            "head": int(head),
            "gap": float(gap[layer, head]),
            "safe_mean": float(safe_mean[layer, head]),
            "unsafe_mean": float(unsafe_mean[layer, head]),
        }
        for layer, head in order
    ]
    layer, head = order[0]
    chosen = angles[:, layer, head]
    threshold = kde_crossing(chosen[~unsafe], chosen[unsafe])
    return HeadChoice(int(layer), int(head), threshold, table, gap, cut)


def guarded_angles(
    decoder: GuardedDecoder,
    batches: Iterable[Batch],
    guards: Callable[[Batch], tuple[torch.Tensor, ...]],
) -> np.ndarray:
    """`oh_angle` [N] as the exported decoder computes it, with the given guard inputs."""
    from .refusal import empty_past

    out = []
    with torch.no_grad():
        for batch in batches:
            past = empty_past(decoder, batch.size, batch.embeds.device)
            inputs = (batch.embeds, batch.attention_mask, batch.position_ids, past, guards(batch))
            out.append(decoder(*inputs)[-1].double().cpu().numpy())
    return np.concatenate(out)
