"""Oh Defense: the deflection of the final state when one attention head is muted.

From layer l on, a muted branch runs with head k's logits scaled by 1e-5 (the same as scaling
that head's query slice), replaying the trunk's other guards; `oh_angle` [B] is the angle in
degrees between the trunk's and the branch's final-norm states at the last position. The
branch runs over `guard_positions` only: at decode there are none and the angle is 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import DecoderHook, DecoderStep

MUTED = "muted"


def deflection_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between vectors in degrees, computed stably for small angles."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    radians = 2.0 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    return radians * (180.0 / math.pi)


class OhHook(DecoderHook):
    """Open the muted-head branch at `layer`; measure its final state's deflection."""

    name = "oh"

    def __init__(self, layer: int, head: int) -> None:
        super().__init__()
        self.layer, self.head = layer, head

    def before_layer(self, index: int, step: DecoderStep) -> None:
        """Fork the muted branch from the trunk's stream entering the chosen layer."""
        if index == self.layer and step.positions is not None:
            step.branches[MUTED] = step.gather(step.hidden, 1)

    def attention(self, index: int, branch: str, step: DecoderStep) -> dict[str, object]:
        """Mute the chosen head in the muted branch, at the chosen layer."""
        return {"muted_head": self.head} if branch == MUTED and index == self.layer else {}

    def outputs(
        self, step: DecoderStep, final: torch.Tensor, norm: nn.Module
    ) -> list[torch.Tensor]:
        """`oh_angle` [B] in degrees at the last position (0 where no branch ran)."""
        if MUTED not in step.branches:
            return [torch.zeros(final.shape[0], dtype=final.dtype)]
        # At decode `positions` is empty: both sides fall back to the last row, angle 0.
        fallback = final[:, -1:]
        muted_last = torch.cat([fallback, norm(step.branches[MUTED])], dim=1)[:, -1]
        normal_last = torch.cat([fallback, step.gather(final, 1)], dim=1)[:, -1]
        return [deflection_degrees(normal_last, muted_last)]
