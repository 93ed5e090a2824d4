"""Where a detector comes from: the name `default`, a checkpoint directory or a hub id.

`default` is the small detector this project trains itself (`train_default.py`); its
checkpoint, concept bank, calibrated thresholds and exported ONNX graphs ship in
guard_models/data/default_detector/. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_NAME", "ResolvedSource", "default_detector_dir", "resolve_detector_source"]

DEFAULT_NAME = "default"


@dataclass(frozen=True)
class ResolvedSource:
    """A detector source made concrete: checkpoint, its own concept bank and thresholds."""

    name: str
    checkpoint: Path | str
    concepts: Path | None = None
    thresholds: dict[str, Any] | None = None


def default_detector_dir() -> Path:
    """The packaged directory of the default detector."""
    return Path(str(resources.files("vlmguard.guard_models").joinpath("data/default_detector")))


def resolve_detector_source(source: str | Path) -> ResolvedSource:
    """Map `default` to the packaged detector; pass any other source through unchanged."""
    if str(source) != DEFAULT_NAME:
        return ResolvedSource(name=str(source), checkpoint=source)
    root = default_detector_dir()
    checkpoint = root / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"the default detector is missing from {root}; reinstall vlmguard or run "
            "python -m vlmguard.guard_models.train_default."
        )
    thresholds_path = root / "thresholds.json"
    thresholds = json.loads(thresholds_path.read_text()) if thresholds_path.is_file() else None
    return ResolvedSource(
        name=DEFAULT_NAME, checkpoint=checkpoint, concepts=root / "concepts.json",
        thresholds=thresholds,
    )
