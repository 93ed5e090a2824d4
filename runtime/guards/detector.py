"""The safety detector as a request stage: its verdict on the image before any model runs.

A flag puts the policy's safety prefix in front of the request (and GuardAlign's calibration on
it, `align.py`); a detector that raises or returns a non-finite score fails closed.
"""

from __future__ import annotations

import math

from vlmguard.errors import BundleError

from ..detector import DetectorNotFoundError, SafetyDetector
from ..detector_variants import NoDetectorVariantError
from ..engine import BundleEngine
from ..policy import GuardPolicy
from ..request import Request, first_line
from .base import FailRule


def load_detector(engine: BundleEngine, policy: GuardPolicy) -> object:
    """The bundle's safety detector, in the variant that fits the providers."""
    record = engine.manifest.detector
    thresholds = dict(record.get("thresholds", {}))
    if policy.detector_threshold is not None:  # applies to the deciding method's score
        method = thresholds.get("method", "ot")
        for key in ("global", "ot") if method == "any" else (method,):
            thresholds[key] = policy.detector_threshold
    try:
        return SafetyDetector(record, engine.bundle, engine.providers, thresholds=thresholds)
    except (DetectorNotFoundError, NoDetectorVariantError, KeyError, TypeError, ValueError) as err:
        raise BundleError(
            f"{engine.bundle}'s safety detector cannot be loaded ({first_line(err)}); "
            "re-export the bundle"
        ) from err


def detector_stage(detector: object | None, row: Request, rule: FailRule) -> None:
    """Judge the request's image; when unsafe, flag it for the safety prefix and calibration."""
    if detector is None:
        row.report.decide("detector", "absent", "the bundle has no safety detector")
        return
    if row.image is None:
        row.report.decide("detector", "pass", "text-only turn: no image to check")
        return
    try:
        with row.report.timed("detector"):
            detection = detector.detect(row.image)
        scores = {
            "detector_global": float(detection.score_global),
            "detector_ot": float(detection.score_ot),
        }
        unsafe = bool(detection.unsafe)
        top = detection.top_concepts[0]["name"] if detection.top_concepts else "?"
    except Exception as err:  # a detector that cannot judge must not wave the image through
        rule.guard_failed(row, "detector", f"the detector failed: {first_line(err)}")
        return
    if not all(math.isfinite(v) for v in scores.values()):
        rule.guard_failed(row, "detector", f"non-finite detector score {scores}")
        return
    row.report.scores |= scores
    row.report.guards_ran.append("detector")
    if unsafe:
        row.flagged = True
        row.report.decide("detector", "flag", f"{detection.reason} (top concept: {top})")
    else:
        row.report.decide("detector", "pass", f"below thresholds (top concept: {top})")
