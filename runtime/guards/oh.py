"""Oh Defense online: read `oh_angle` after prefill; take the refusal path past the threshold.

The refusal path re-runs the prefill with the policy's safety instruction before the request
and the answer forced to open with the policy's refusal opening, then decodes freely.
"""

from __future__ import annotations

import math

import numpy as np

from ..request import Request
from .base import DecoderGuardStage, PrefillLayout


class OhStage(DecoderGuardStage):
    """Compare each request's angle with the policy's threshold."""

    name = "oh"

    def after_prefill(
        self, rows: list[Request], outputs: dict[str, np.ndarray], layout: PrefillLayout
    ) -> None:
        """Set `refusal_path` on the requests whose angle passes the threshold."""
        angles = outputs.get("oh_angle")
        for i, row in enumerate(rows):
            if row.done or row.refusal_path:
                continue
            if angles is None or angles.shape != (len(rows),):
                self.rule.guard_failed(row, "oh", "the decoder returned no usable oh_angle")
                continue
            angle = float(angles[i])
            if not math.isfinite(angle):
                self.rule.guard_failed(row, "oh", f"oh_angle is not finite ({angle})")
                continue
            row.report.scores["oh_angle"] = angle
            threshold = self.policy.oh_threshold
            if threshold is None:
                row.report.decide("oh", "observe", "no calibrated threshold: angle reported only")
            elif angle > threshold:
                row.refusal_path = True
                row.report.decide(
                    "oh", "refusal_path", f"angle {angle:.3f} > {threshold:.3f} degrees"
                )
            else:
                row.report.decide("oh", "pass", f"angle {angle:.3f} <= {threshold:.3f} degrees")
