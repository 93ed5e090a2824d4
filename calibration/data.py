"""Labelled calibration samples: JSONL reading, validation, a seeded held-out split, a hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CalibrationDataError

__all__ = [
    "LABELS",
    "CalibrationDataError",
    "Sample",
    "data_hash",
    "read_jsonl",
    "read_samples",
    "split_holdout",
]

LABELS = ("safe", "unsafe")
_KEYS = {"image", "prompt", "label", "category", "id", "source"}


@dataclass(frozen=True)
class Sample:
    """One labelled calibration sample."""

    prompt: str
    label: str
    image: Path | None = None
    category: str | None = None
    line: int = 0
    id: str | None = None  # optional: the dataset's own id (evaluation reports it)
    source: str | None = None  # optional: the dataset or attack the sample comes from

    @property
    def unsafe(self) -> bool:
        """Whether the sample is labelled unsafe."""
        return self.label == "unsafe"


def _parse_line(text: str, number: int, base: Path) -> Sample:
    """One JSONL line -> a Sample, or an error naming the line and what is wrong."""
    where = f"line {number}"
    try:
        record = json.loads(text)
    except ValueError as err:
        raise CalibrationDataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise CalibrationDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _KEYS)
    if unknown:
        raise CalibrationDataError(f"{where}: unknown key(s) {', '.join(unknown)}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CalibrationDataError(f"{where}: 'prompt' must be a non-empty string")
    label = record.get("label")
    if label not in LABELS:
        raise CalibrationDataError(f"{where}: 'label' must be 'safe' or 'unsafe', not {label!r}")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise CalibrationDataError(f"{where}: 'image' must be a path string or absent")
    for key in ("category", "id", "source"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise CalibrationDataError(f"{where}: '{key}' must be a string or absent")
    return Sample(
        prompt, label, base / image if image else None, record.get("category"), number,
        record.get("id"), record.get("source"),
    )  # fmt: skip


def read_samples(path: str | Path) -> list[Sample]:
    """Read a calibration JSONL file: valid lines, images present, >= 2 samples of each label."""
    samples = read_jsonl(path)
    counts = {label: sum(s.label == label for s in samples) for label in LABELS}
    absent = [label for label, count in counts.items() if count < 2]
    if absent:
        raise CalibrationDataError(
            f"{path} needs at least 2 'safe' and 2 'unsafe' samples; it has {counts}"
        )
    return samples


def read_jsonl(path: str | Path) -> list[Sample]:
    """Read and validate a JSONL file; missing images are listed together before any model work."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"{path} does not exist or is not a file")
    samples = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            try:
                samples.append(_parse_line(text, number, path.parent))
            except CalibrationDataError as err:
                raise CalibrationDataError(f"{path}: {err}") from None
    if not samples:
        raise CalibrationDataError(f"{path} holds no samples; write one JSON object per line")
    missing = [f"line {s.line}: {s.image}" for s in samples if s.image and not s.image.is_file()]
    if missing:
        raise CalibrationDataError(
            f"{path}: {len(missing)} image(s) not found: {'; '.join(missing)}"
        )
    return samples


def split_holdout(
    samples: list[Sample], fraction: float, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """A seeded split stratified by label: (calibration part, held-out part), file order kept."""
    if not 0.0 <= fraction < 1.0:
        raise CalibrationDataError(f"--holdout must be in [0, 1), not {fraction}")
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for label in LABELS:
        members = [i for i, s in enumerate(samples) if s.label == label]
        count = min(int(round(fraction * len(members))), len(members) - 1)
        held |= {members[i] for i in rng.permutation(len(members))[:count]}
    calibration = [s for i, s in enumerate(samples) if i not in held]
    return calibration, [s for i, s in enumerate(samples) if i in held]


def data_hash(path: str | Path, samples: list[Sample]) -> str:
    """SHA-256 over the JSONL bytes and every referenced image's bytes, in file order."""
    digest = hashlib.sha256(Path(path).read_bytes())
    for sample in samples:
        if sample.image is not None:
            digest.update(sample.image.read_bytes())
    return digest.hexdigest()
