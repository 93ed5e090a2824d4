"""The safety detector's global and OT scores on the samples' images, and their thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Sample
from .thresholds import rates, threshold_at_fpr

DETECTOR_SCORES = ("global", "ot")


def detector_scores(source: str | Path, samples: list[Sample]) -> dict[str, np.ndarray]:
    """Scores [N] per kind (NaN where a sample has no image), from an exported detector."""
    from vlmguard.runtime.detector import SafetyDetector
    from vlmguard.runtime.image_preprocess import preprocess_image

    detector = SafetyDetector.load(source)
    scores = {kind: np.full(len(samples), np.nan) for kind in DETECTOR_SCORES}
    for index, sample in enumerate(samples):
        if sample.image is None:
            continue
        outputs = detector.run(preprocess_image(sample.image, detector.preprocessor))
        for kind in DETECTOR_SCORES:
            scores[kind][index] = float(outputs[f"det_score_{kind}"][0])
    return scores


def detector_thresholds(
    scores: dict[str, np.ndarray], unsafe: np.ndarray, held_out: np.ndarray, target_fpr: float
) -> dict:
    """Per score kind: the threshold (flag when score >= it) and calibration/held-out rates."""
    record = {}
    for kind, values in scores.items():
        has = np.isfinite(values)
        cal, held = has & ~held_out, has & held_out
        if not (cal & ~unsafe).any():
            record[kind] = {"skipped": "no safe samples with images in the calibration part"}
            continue
        above = threshold_at_fpr(values[cal & ~unsafe], target_fpr)
        threshold = float(np.nextafter(above, np.inf))  # the detector flags score >= threshold
        record[kind] = {
            "threshold": threshold,
            "calibration": rates(values[cal], unsafe[cal], above).to_dict(),
            "held_out": rates(values[held], unsafe[held], above).to_dict() if held.any() else None,
        }
    return record
