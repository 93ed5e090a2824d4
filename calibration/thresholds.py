"""Thresholds on scores where higher means unsafe: target-FPR, KDE crossing, rates and ROC."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import CalibrationOptionError, ScoreError

_GRID = 2048


@dataclass(frozen=True)
class Rates:
    """True- and false-positive rates of a threshold (flag when score > threshold)."""

    tpr: float
    fpr: float
    unsafe: int
    safe: int

    def to_dict(self) -> dict:
        """The JSON form."""
        return {"tpr": self.tpr, "fpr": self.fpr, "unsafe": self.unsafe, "safe": self.safe}


def _clean(scores: np.ndarray, name: str) -> np.ndarray:
    """A finite, non-empty float64 vector, or a ScoreError naming it."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ScoreError(f"no {name} scores to calibrate on")
    if not np.isfinite(scores).all():
        raise ScoreError(f"{name} scores contain non-finite values")
    return scores


def threshold_at_fpr(safe: np.ndarray, target_fpr: float) -> float:
    """A threshold flagging (score > t) at most `target_fpr` of the safe scores, mid-gap."""
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationOptionError(f"target FPR must be in [0, 1), not {target_fpr}")
    ordered = np.sort(_clean(safe, "safe"))
    allowed = int(math.floor(target_fpr * ordered.size + 1e-9))
    below = ordered[ordered.size - allowed - 1]
    if allowed == 0:
        return float(below)
    return float((below + ordered[ordered.size - allowed]) / 2.0)


def rates(scores: np.ndarray, unsafe: np.ndarray, threshold: float) -> Rates:
    """TPR and FPR of flagging score > threshold against the labels (True = unsafe)."""
    scores, unsafe = np.asarray(scores, dtype=np.float64), np.asarray(unsafe, dtype=bool)
    flagged = scores > threshold
    n_unsafe, n_safe = int(unsafe.sum()), int((~unsafe).sum())
    tpr = float(flagged[unsafe].mean()) if n_unsafe else float("nan")
    fpr = float(flagged[~unsafe].mean()) if n_safe else float("nan")
    return Rates(tpr, fpr, n_unsafe, n_safe)


def roc_points(scores: np.ndarray, unsafe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores, unsafe = np.asarray(scores, dtype=np.float64), np.asarray(unsafe, dtype=bool)
    cuts = np.concatenate([[np.inf], np.unique(scores)[::-1], [-np.inf]])
    fpr = np.array([(scores[~unsafe] > c).mean() if (~unsafe).any() else 0.0 for c in cuts])
    tpr = np.array([(scores[unsafe] > c).mean() if unsafe.any() else 0.0 for c in cuts])
    fpr[-1] = tpr[-1] = 1.0
    return fpr, tpr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve (trapezoids)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def log_kde(samples: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Log density of a Gaussian KDE with Scott's bandwidth (as scipy's) on a grid."""
    samples = _clean(samples, "KDE")
    spread = samples.std(ddof=1) if samples.size > 1 else 0.0
    # Floor: 1% of the grid's span, so a class of identical scores still has a usable width.
    width = max(spread * samples.size ** (-1.0 / 5.0), 0.01 * float(np.ptp(grid)), 1e-12)
    exponent = -0.5 * ((grid[:, None] - samples[None, :]) / width) ** 2
    top = exponent.max(axis=1)
    log_sum = top + np.log(np.exp(exponent - top[:, None]).sum(axis=1))
    return log_sum - math.log(samples.size * width * math.sqrt(2.0 * math.pi))


def balanced_accuracy(safe: np.ndarray, unsafe: np.ndarray, threshold: float) -> float:
    """Mean of TPR and TNR when flagging score > threshold."""
    return 0.5 * (float((unsafe > threshold).mean()) + float((safe <= threshold).mean()))


def kde_crossing(safe: np.ndarray, unsafe: np.ndarray) -> float:
    """Oh Defense's threshold: the safe/unsafe KDE crossing with the best balanced accuracy."""
    safe, unsafe = _clean(safe, "safe"), _clean(unsafe, "unsafe")
    lo, hi = min(safe.min(), unsafe.min()), max(safe.max(), unsafe.max())
    pad = 0.05 * (hi - lo) + 1e-9
    grid = np.linspace(lo - pad, hi + pad, _GRID)
    diff = log_kde(unsafe, grid) - log_kde(safe, grid)
    sign = np.sign(diff)
    idx = np.nonzero(sign[:-1] * sign[1:] < 0)[0]
    # Linear interpolation of each sign change; the midpoint of the means if none is found.
    crossings = [grid[i] - diff[i] * (grid[i + 1] - grid[i]) / (diff[i + 1] - diff[i]) for i in idx]
    if not crossings:
        crossings = [(safe.mean() + unsafe.mean()) / 2.0]
    scored = [(balanced_accuracy(safe, unsafe, c), -abs(c - safe.mean()), c) for c in crossings]
    return float(max(scored)[2])
