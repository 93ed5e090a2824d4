"""What a guard's torch hook may do inside the guarded decoder, and the step state it sees.

The decoder (`decoder.py`) runs the family's layers over the trunk and over any side branches
the hooks open; at every layer it asks each hook what to add to each branch's attention
(`AttentionGuard` fields) and lets it act before and after the layer. A guard is one hook
class in one file of this package (`align.py`, `ptr.py`, `oh.py`); the decoder knows none of
their details.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

TRUNK = "trunk"  # the branch whose logits and KV cache the graph returns


@dataclass
class DecoderStep:
    """One prefill or decode step, as the hooks see it."""

    inputs: dict[str, torch.Tensor]  # the graph's guard inputs, by name
    attention_mask: torch.Tensor  # [B, total]
    past_len: int | torch.Tensor
    seq_len: int | torch.Tensor
    positions: torch.Tensor | None  # chunk positions the side branches run over (None: none)
    hidden: torch.Tensor  # the trunk's residual stream entering the current layer
    branches: dict[str, torch.Tensor] = field(default_factory=dict)  # side branches' streams
    gather: Callable[..., torch.Tensor] | None = None  # (x, dim, keys=False) -> x at positions


class DecoderHook(nn.Module):
    """A guard's torch side: acts around layers, adds to attention, contributes graph outputs."""

    name: str = ""

    def begin(self, step: DecoderStep) -> None:
        """Prepare per-step tensors before the first layer."""

    def before_layer(self, index: int, step: DecoderStep) -> None:
        """Act on the streams entering layer `index` (open a branch, choose tokens)."""

    def attention(self, index: int, branch: str, step: DecoderStep) -> dict[str, object]:
        """`AttentionGuard` fields this guard sets for `branch` at layer `index`."""
        return {}

    def after_layer(self, index: int, step: DecoderStep) -> None:
        """Act on the streams leaving layer `index` (merge or close a branch)."""

    def outputs(
        self, step: DecoderStep, final: torch.Tensor, norm: nn.Module
    ) -> list[torch.Tensor]:
        """This guard's graph outputs, given the trunk's final-norm states."""
        return []
