"""GuardAlign online: the per-layer strengths and the safety prefix's positions as decoder feeds.

The prefix is only in the prompt when the detector flagged the image (`detector.py`), so
`align_prefix_mask` marks it for those requests; decode steps extend the mask with zeros, so
generated tokens stay calibrated towards the prefix.
"""

from __future__ import annotations

import numpy as np

from ..request import Batch, Request
from .base import DecoderGuardStage, PrefillLayout

PREFIX_MASK = "align_prefix_mask"


class AlignStage(DecoderGuardStage):
    """Feed `align_gamma` always and `align_prefix_mask` for the flagged requests."""

    name = "align"

    def __init__(self, *args: object, gamma: np.ndarray) -> None:
        super().__init__(*args)
        self.gamma = gamma

    def prefill_feeds(self, rows: list[Request], layout: PrefillLayout) -> dict[str, np.ndarray]:
        """Strengths, and the prefix rows of the requests the detector flagged."""
        for row in rows:
            if row.flagged:
                row.report.decide("align", "calibrate", "detector flagged: safety prefix on")
        flagged = [row.flagged for row in rows]
        return {"align_gamma": self.gamma, PREFIX_MASK: layout.row_mask("prefix_rows", flagged)}

    def decode_feeds(self, size: int) -> dict[str, np.ndarray]:
        """The strengths stay on while decoding."""
        return {"align_gamma": self.gamma}

    def begin_decode(self, batch: Batch, feeds: dict[str, np.ndarray]) -> None:
        """Carry the prefill's prefix mask into the decode loop."""
        batch.guard_state[PREFIX_MASK] = feeds[PREFIX_MASK]

    def step_feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        """The prefix mask grown by one (not-prefix) position."""
        prefix = batch.guard_state[PREFIX_MASK]
        prefix = np.concatenate([prefix, np.zeros((prefix.shape[0], 1), np.int64)], axis=1)
        batch.guard_state[PREFIX_MASK] = prefix
        return {PREFIX_MASK: prefix}
