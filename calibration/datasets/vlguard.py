"""VLGuard's test set (Zong et al., ICML 2024; huggingface.co/datasets/ys-zong/VLGuard) -> samples.

Layout mirrored (the dataset's `test.json` with `test.zip` unpacked beside it):

    DIR/test.json   [{"id", "image": "bad_ads/....png", "safe": bool,
                      "harmful_category", "harmful_subcategory" (unsafe images only),
                      "instr-resp": [{"safe_instruction" | "unsafe_instruction" | "instruction",
                                      "response"}, ...]}, ...]
    DIR/test/<image>

The three subsets of VLGuard's own evaluation (VLGuard_eval.py), used as the categories:
`unsafes` (unsafe image, its "instruction": unsafe), `safe_unsafes` (safe image with its
"unsafe_instruction": unsafe) and `safe_safes` (safe image with its "safe_instruction": safe,
the over-defense check).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..data import Sample
from .common import DatasetError, check_images, first_existing, read_json, require_dir

SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")
LAYOUT = "test.json with its images under test/"
_KEY = {
    "unsafes": "instruction",
    "safe_unsafes": "unsafe_instruction",
    "safe_safes": "safe_instruction",
}


def _instruction(entry: dict, key: str) -> str | None:
    """The first instruction stored under `key` in the entry's instr-resp list."""
    pairs = entry.get("instr-resp")
    if not isinstance(pairs, list):
        return None
    return next((p[key] for p in pairs if isinstance(p, dict) and p.get(key)), None)


def read_vlguard(root: str | Path, subsets: Iterable[str] = SUBSETS) -> list[Sample]:
    """The chosen subsets of VLGuard's test set, in file order (subset as category)."""
    subsets = tuple(subsets)
    unknown = sorted(set(subsets) - set(SUBSETS))
    if unknown or not subsets:
        raise DatasetError(f"unknown VLGuard subset(s) {unknown}; use {', '.join(SUBSETS)}")
    root = require_dir(root)
    meta = first_existing(root, ["test.json"], LAYOUT)
    entries = read_json(meta)
    if not isinstance(entries, list):
        raise DatasetError(f"{meta}: expected a list of entries")
    images = root / "test"
    samples = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("safe"), bool):
            raise DatasetError(f"{meta}: entry {index} has no boolean 'safe'")
        if not isinstance(entry.get("image"), str):
            raise DatasetError(f"{meta}: entry {index} has no 'image' path")
        wanted = ("safe_unsafes", "safe_safes") if entry["safe"] else ("unsafes",)
        for subset in (s for s in wanted if s in subsets):
            prompt = _instruction(entry, _KEY[subset])
            if prompt is None:
                if subset == "safe_unsafes":  # VLGuard's loader tolerates these being absent
                    continue
                raise DatasetError(f"{meta}: entry {index} has no {_KEY[subset]!r}")
            label = "safe" if subset == "safe_safes" else "unsafe"
            name = entry.get("id", str(index))
            samples.append(
                Sample(prompt, label, images / entry["image"], subset, 0,
                       f"vlguard/{subset}/{name}", "vlguard")
            )  # fmt: skip
    check_images(samples, "VLGuard test")
    return samples
