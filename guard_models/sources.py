"""Where a detector comes from: the name `default`, a checkpoint directory or a hub id.

`default` is the small detector this project trains itself (`train_default.py`); its
checkpoint, concept bank, calibrated thresholds and exported ONNX graphs ship together in
the runtime's data (runtime/data/default_detector/), since the runtime serves its graphs.
Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmguard.errors import VlmguardError
from vlmguard.runtime.detector import DEFAULT_NAME, default_detector_dir

__all__ = ["DefaultDetectorMissingError", "ResolvedSource", "resolve_detector_source"]


class DefaultDetectorMissingError(VlmguardError, FileNotFoundError):
    """The packaged default detector's checkpoint is not where the package puts it."""


@dataclass(frozen=True)
class ResolvedSource:
    """A detector source made concrete: checkpoint, its own concept bank and thresholds."""

    name: str
    checkpoint: Path | str
    concepts: Path | None = None
    thresholds: dict[str, Any] | None = None


def resolve_detector_source(source: str | Path) -> ResolvedSource:
    """Map `default` to the packaged detector; pass any other source through unchanged."""
    if str(source) != DEFAULT_NAME:
        return ResolvedSource(name=str(source), checkpoint=source)
    root = default_detector_dir()
    checkpoint = root / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        raise DefaultDetectorMissingError(
            f"the default detector is missing from {root}; reinstall vlmguard or run "
            "python -m vlmguard.guard_models.train_default."
        )
    thresholds_path = root / "thresholds.json"
    thresholds = json.loads(thresholds_path.read_text()) if thresholds_path.is_file() else None
    return ResolvedSource(
        name=DEFAULT_NAME,
        checkpoint=checkpoint,
        concepts=root / "concepts.json",
        thresholds=thresholds,
    )
