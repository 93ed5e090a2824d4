"""SafePTR online: which rows are image and instruction tokens, K, and the pruned-key check.

At prefill the graph chooses the tokens to prune and returns `ptr_pruned_mask`; every decode
step must hand it on (the engine carries it back as `ptr_past_pruned_mask`) with the pruned
keys still set, or the request is refused: a step that unmasks them would decode unguarded.
"""

from __future__ import annotations

import numpy as np

from ..engine import DecoderState
from ..request import Batch, Request, describe
from .base import DecoderGuardStage, PrefillLayout

PAST_MASK = "ptr_past_pruned_mask"


class PtrStage(DecoderGuardStage):
    """Feed the token groups and K; check and report the pruned-token mask."""

    name = "ptr"

    def _k(self) -> np.ndarray:
        """The policy's K fraction as the graph takes it."""
        return np.array(self.policy.ptr_k_fraction, np.float32)

    def prefill_feeds(self, rows: list[Request], layout: PrefillLayout) -> dict[str, np.ndarray]:
        """Image and instruction rows of every prompt, and K."""
        return {
            "ptr_image_mask": layout.row_mask("image_rows"),
            "ptr_instruction_mask": layout.row_mask("instruction_rows"),
            "ptr_k_fraction": self._k(),
        }

    def decode_feeds(self, size: int) -> dict[str, np.ndarray]:
        """Nothing new to prune while decoding."""
        return {
            "ptr_image_mask": np.zeros((size, 1), np.int64),
            "ptr_instruction_mask": np.zeros((size, 1), np.int64),
            "ptr_k_fraction": self._k(),
        }

    def after_prefill(
        self, rows: list[Request], outputs: dict[str, np.ndarray], layout: PrefillLayout
    ) -> None:
        """Check the pruned-token mask (0/1 per position) and report how many it masked."""
        pruned = outputs.get("ptr_pruned_mask")
        usable = (
            isinstance(pruned, np.ndarray)
            and pruned.shape == (len(rows), layout.width)
            and (pruned.dtype == np.bool_ or np.issubdtype(pruned.dtype, np.integer))
            and bool(np.isin(pruned, (0, 1)).all())
        )
        for i, row in enumerate(rows):
            if not usable:
                reason = f"the decoder returned no usable pruned-token mask ({describe(pruned)})"
                self.rule.guard_failed(row, "ptr", reason)
                continue
            row.report.pruned_tokens = int(pruned[i].sum())
            count = row.report.pruned_tokens
            row.report.decide("ptr", "prune", f"{count} token{'s' * (count != 1)} masked")

    def after_step(self, batch: Batch, before: DecoderState, after: DecoderState) -> None:
        """Refuse the live requests when a decode step did not carry the pruned-key mask on."""
        old, new = before.carried.get(PAST_MASK), after.carried.get(PAST_MASK)
        if old is None:
            return
        width = old.shape[1]
        if not (
            isinstance(new, np.ndarray)
            and new.shape == (old.shape[0], width + 1)
            and np.array_equal(new[:, :width], old)
        ):
            for row in batch.live():
                self.rule.guard_failed(
                    row, "ptr", "a decode step dropped SafePTR's pruned-key mask"
                )
