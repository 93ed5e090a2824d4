"""GuardAlign's attentive calibration: Z + gamma_l * relu(Z) from queries after the prefix to it.

Inputs `align_gamma` [layers] (0 turns a layer off) and `align_prefix_mask` [B, total] (the
safety prefix's positions); applied in the trunk and in every side branch, at prefill and decode.
"""

from __future__ import annotations

import torch

from .base import TRUNK, DecoderHook, DecoderStep


def align_calibrated(prefix_mask: torch.Tensor, past_len: int, seq_len: int) -> torch.Tensor:
    """GuardAlign's target cells [B, 1, Q, K]: queries after the safety prefix, keys inside it."""
    total = prefix_mask.shape[1]
    in_prefix = prefix_mask.bool()
    key_at = torch.arange(total, device=prefix_mask.device)
    prefix_end = torch.where(in_prefix, key_at[None, :], -1).amax(dim=-1)  # [B], -1 if none
    query_at = torch.arange(seq_len, device=prefix_mask.device) + past_len
    after = query_at[None, :] > prefix_end[:, None]  # [B, Q]
    return (after[:, :, None] & in_prefix[:, None, :])[:, None]


class AlignHook(DecoderHook):
    """Boost attention from calibrated queries to the safety prefix's keys, per layer."""

    name = "align"

    def begin(self, step: DecoderStep) -> None:
        """The calibrated cells of this step, for the trunk and (gathered) the branches."""
        prefix = step.inputs["align_prefix_mask"]
        self.cells = align_calibrated(prefix, step.past_len, step.seq_len)
        self.branch_cells = None
        if step.positions is not None:
            self.branch_cells = step.gather(step.gather(self.cells, 2), 3, keys=True)

    def attention(self, index: int, branch: str, step: DecoderStep) -> dict[str, object]:
        """Every branch gets this layer's gamma over its calibrated cells."""
        cells = self.cells if branch == TRUNK else self.branch_cells
        return {"align_gamma": step.inputs["align_gamma"][index], "align_calibrated": cells}
