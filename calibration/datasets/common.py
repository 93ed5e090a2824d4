"""What the dataset readers share: their error, layout checks, CSV rows and the JSONL writer."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmguard.errors import VlmguardError

from ..data import Sample


class DatasetError(VlmguardError):
    """A local dataset copy is missing, not in the expected layout, or malformed."""


def require_dir(root: str | Path) -> Path:
    """The dataset root as a Path, or an error when it is not a directory."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist or is not a directory")
    return root


def first_existing(root: Path, candidates: Iterable[str], layout: str) -> Path:
    """The first of `candidates` (relative to root) that exists, else an error naming `layout`."""
    candidates = list(candidates)
    for relative in candidates:
        if (root / relative).exists():
            return root / relative
    tried = ", ".join(candidates)
    raise DatasetError(f"{root} is not in the expected layout ({layout}): none of {tried} found")


def csv_rows(path: Path, columns: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file that must have the given columns."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = sorted(set(columns) - set(reader.fieldnames or ()))
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            yield reader.line_num, row


def read_json(path: Path) -> object:
    """A JSON file's content, or an error naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def check_images(samples: list[Sample], what: str) -> None:
    """Fail, naming a few, when any sample's image file is missing."""
    missing = [str(s.image) for s in samples if s.image is not None and not s.image.is_file()]
    if missing:
        shown = "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else "")
        raise DatasetError(f"{len(missing)} {what} image(s) not found: {shown}")


def limit_samples(
    samples: list[Sample], limit: int | None = None, per_category: int | None = None
) -> list[Sample]:
    """At most `per_category` samples of each category, then at most `limit` in all; order kept."""
    if per_category is not None:
        seen: dict[str | None, int] = {}
        kept = []
        for sample in samples:
            seen[sample.category] = seen.get(sample.category, 0) + 1
            if seen[sample.category] <= per_category:
                kept.append(sample)
        samples = kept
    return samples if limit is None else samples[:limit]


def sample_record(sample: Sample, base: Path) -> dict:
    """A sample as one JSONL object, its image path relative to `base` where possible."""
    record: dict[str, str] = {}
    if sample.image is not None:
        image = Path(os.path.abspath(sample.image))
        try:
            record["image"] = Path(os.path.relpath(image, os.path.abspath(base))).as_posix()
        except ValueError:  # another drive (Windows): keep it absolute
            record["image"] = str(image)
    record |= {"prompt": sample.prompt, "label": sample.label}
    for key in ("category", "id", "source"):
        if getattr(sample, key) is not None:
            record[key] = getattr(sample, key)
    return record


def write_jsonl(samples: Iterable[Sample], out: str | Path) -> Path:
    """Write samples as evaluation JSONL (the calibration format plus id and source)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(sample_record(s, out.parent), ensure_ascii=False) for s in samples]
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out
