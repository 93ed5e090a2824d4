"""Calibration's errors: each a `VlmguardError`, so the CLI says it in one line."""

from __future__ import annotations

from vlmguard.errors import VlmguardError


class CalibrationError(VlmguardError):
    """Base class of the errors calibration and evaluation raise for the user's input."""


class CalibrationDataError(CalibrationError):
    """The calibration data file is missing, malformed or unusable."""


class SampleError(CalibrationDataError):
    """One sample (its image or its prompt) cannot be encoded as the runtime would encode it."""


class CalibrationOptionError(CalibrationError, ValueError):
    """An option value calibration cannot use (a rate, a batch size, a device)."""


class ScoreError(CalibrationError, ValueError):
    """Scores no threshold can be set on (none at all, or non-finite ones)."""
