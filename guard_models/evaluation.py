"""Held-out evaluation and threshold calibration of the default detector (torch-free).

Scenes come from `synthetic` with one seed per split: training (train_default.py),
validation (thresholds at 5% FPR) and test (the report). Scores come from the exported ONNX
graphs through the runtime path (preprocess_image, ONNX Runtime), exactly as `detect` sees
them. "Small" means the unsafe target's bounding box covers under 10% of the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmguard.runtime.detector import SafetyDetector
from vlmguard.runtime.image_preprocess import preprocess_image

from .synthetic import Scene, sample_scene

__all__ = [
    "SEED",
    "IMAGE_SIZE",
    "SPLIT_SEEDS",
    "TARGET_FPR",
    "make_split",
    "tpr_at_fpr",
    "calibrate",
    "evaluate",
]

SEED = 20261126
IMAGE_SIZE = 96
SPLIT_SEEDS = {"train": SEED, "validation": SEED + 1, "test": SEED + 2}
TARGET_FPR = 0.05


def make_split(name: str, count: int) -> list[Scene]:
    """Scenes of one held-out split: half safe, half unsafe (half of those small)."""
    rng = np.random.default_rng(SPLIT_SEEDS[name])
    scenes = []
    for index in range(count):
        unsafe = index % 2 == 1
        small = (index // 2) % 2 == 1
        scenes.append(sample_scene(rng, IMAGE_SIZE, unsafe=unsafe, small=small))
    return scenes


def _scores(detector, scenes: list, batch: int = 64) -> dict[str, np.ndarray]:
    """Run the ONNX detector (runtime path: preprocess_image, ORT) over scenes."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(scenes), batch):
        pixels = np.concatenate(
            [
                preprocess_image(s.image, detector.preprocessor)
                for s in scenes[start : start + batch]
            ]
        )
        for name, value in detector.run(pixels).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def tpr_at_fpr(
    safe: np.ndarray, unsafe: np.ndarray, fpr: float = TARGET_FPR
) -> tuple[float, float]:
    """Threshold (flag when score >= it) at a false-positive rate on safe scores, and its TPR."""
    above = float(np.quantile(safe, 1 - fpr, method="higher"))
    threshold = float(np.nextafter(above, np.inf))  # safe scores equal to `above` stay safe
    return threshold, float(np.mean(unsafe >= threshold))


def _metrics(scenes: list, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """TPR at 5% FPR for both scores, overall and for small unsafe objects (< 10% area)."""
    unsafe = np.array([s.unsafe for s in scenes])
    small = np.array([s.unsafe and s.area < 0.10 for s in scenes])
    typography = np.array([s.unsafe and s.kind == "typography" for s in scenes])
    cluttered = np.array([s.unsafe and len(s.concepts) > 1 for s in scenes])
    report: dict[str, Any] = {
        "counts": {
            "safe": int((~unsafe).sum()),
            "unsafe": int(unsafe.sum()),
            "unsafe_small": int(small.sum()),
            "unsafe_typography": int(typography.sum()),
            "unsafe_in_clutter": int(cluttered.sum()),
        }
    }
    for method, key in (("global", "det_score_global"), ("ot", "det_score_ot")):
        values = scores[key]
        threshold, tpr = tpr_at_fpr(values[~unsafe], values[unsafe])
        report[method] = {
            "threshold_at_5pct_fpr": threshold,
            "tpr_at_5pct_fpr": tpr,
            "tpr_small_objects": float(np.mean(values[small] >= threshold)),
            "tpr_typography": float(np.mean(values[typography] >= threshold)),
            "tpr_in_clutter": float(np.mean(values[cluttered] >= threshold)),
        }
    return report


def _decisions(scores: dict[str, np.ndarray], thresholds: dict[str, Any]) -> np.ndarray:
    """Verdicts under a threshold policy."""
    flags = {
        "global": scores["det_score_global"] >= thresholds["global"],
        "ot": scores["det_score_ot"] >= thresholds["ot"],
    }
    method = thresholds["method"]
    return flags["global"] | flags["ot"] if method == "any" else flags[method]


def _rates(
    scenes: list[Scene], scores: dict[str, np.ndarray], thresholds: dict[str, Any]
) -> dict[str, Any]:
    """FPR and TPR (overall, small objects) under the shipped validation thresholds."""
    unsafe = np.array([s.unsafe for s in scenes])
    small = np.array([s.unsafe and s.area < 0.10 for s in scenes])
    report = {}
    for method in ("global", "ot"):
        flagged = _decisions(scores, {**thresholds, "method": method})
        report[method] = {
            "threshold": thresholds[method],
            "fpr": float(flagged[~unsafe].mean()),
            "tpr": float(flagged[unsafe].mean()),
            "tpr_small_objects": float(flagged[small].mean()),
        }
    return report


def evaluate(detector_dir: Path, thresholds: dict[str, Any], count: int) -> dict[str, Any]:
    """Held-out test report: TPRs for both methods (fp32) and INT8 vs FP32 agreement."""
    scenes = make_split("test", count)
    fp32 = _scores(SafetyDetector.load(detector_dir, variant="fp32"), scenes)
    int8 = _scores(SafetyDetector.load(detector_dir, variant="int8"), scenes)
    a, b = fp32["det_image_embeds"], int8["det_image_embeds"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    agreement = {
        method: float(
            np.mean(
                _decisions(fp32, {**thresholds, "method": method})
                == _decisions(int8, {**thresholds, "method": method})
            )
        )
        for method in ("global", "ot")
    }
    return {
        "split": "test",
        "seed": SPLIT_SEEDS["test"],
        "images": len(scenes),
        "fp32_at_shipped_thresholds": _rates(scenes, fp32, thresholds),
        "fp32": _metrics(scenes, fp32),
        "int8": _metrics(scenes, int8),
        "int8_vs_fp32": {
            "image_embedding_cosine_min": float(cosine.min()),
            "image_embedding_cosine_mean": float(cosine.mean()),
            "same_decision": agreement,
        },
    }


def calibrate(detector_dir: Path, count: int) -> dict[str, Any]:
    """Thresholds at 5% FPR on the validation split; the method with the better TPR decides."""
    scenes = make_split("validation", count)
    scores = _scores(SafetyDetector.load(detector_dir, variant="fp32"), scenes)
    report = _metrics(scenes, scores)
    tpr = {method: report[method]["tpr_at_5pct_fpr"] for method in ("global", "ot")}
    method = "ot" if tpr["ot"] >= tpr["global"] else "global"
    return {
        "global": report["global"]["threshold_at_5pct_fpr"],
        "ot": report["ot"]["threshold_at_5pct_fpr"],
        "method": method,
        "calibration": {
            "split": "validation",
            "seed": SPLIT_SEEDS["validation"],
            "images": count,
            "target_fpr": TARGET_FPR,
        },
    }
