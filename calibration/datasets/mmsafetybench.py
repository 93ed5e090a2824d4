"""MM-SafetyBench (Liu et al., ECCV 2024; github.com/isXinLiu/MM-SafetyBench) -> samples.

Layout mirrored (the repository's questions plus its image archive unpacked beside them):

    DIR/data/processed_questions/01-Illegal_Activitiy.json   (also DIR/processed_questions/)
        {"0": {"Question", "GPT-Pred", "Changed Question", "Key Phrase", "Phrase Type",
               "Rephrased Question", "Rephrased Question(SD)"}, "1": ...}
    DIR/imgs/01-Illegal_Activitiy/{SD,SD_TYPO,TYPO}/0.jpg    (also DIR/data/imgs/)

Thirteen scenarios (the file stems, upstream spelling kept, are the categories), all labelled
unsafe. The image variant picks the question as the benchmark pairs them: SD -> "Rephrased
Question(SD)", SD_TYPO and TYPO -> "Rephrased Question"; "text" is the text-only baseline
("Question", no image).
"""

from __future__ import annotations

from pathlib import Path

from ..data import Sample
from .common import DatasetError, check_images, first_existing, read_json, require_dir

VARIANTS = {
    "SD_TYPO": "Rephrased Question",
    "SD": "Rephrased Question(SD)",
    "TYPO": "Rephrased Question",
    "text": "Question",
}
LAYOUT = "data/processed_questions/*.json and imgs/<scenario>/<variant>/<id>.jpg"


def _key_order(key: str) -> tuple[int, str]:
    """Numeric ids in numeric order, anything else after them."""
    return (int(key), "") if key.isdigit() else (1 << 62, key)


def read_mmsafetybench(
    root: str | Path, variant: str = "SD_TYPO", question_field: str | None = None
) -> list[Sample]:
    """Every question of every scenario, paired with the variant's image (unsafe samples)."""
    if variant not in VARIANTS:
        raise DatasetError(f"unknown MM-SafetyBench variant {variant!r}; use {', '.join(VARIANTS)}")
    root = require_dir(root)
    questions = first_existing(root, ["data/processed_questions", "processed_questions"], LAYOUT)
    files = sorted(questions.glob("*.json"))
    if not files:
        raise DatasetError(f"{questions} holds no scenario .json files (layout: {LAYOUT})")
    images = None if variant == "text" else first_existing(root, ["imgs", "data/imgs"], LAYOUT)
    field = question_field or VARIANTS[variant]
    samples = []
    for path in files:
        entries = read_json(path)
        if not isinstance(entries, dict):
            raise DatasetError(f"{path}: expected an object of id -> question entry")
        for key in sorted(entries, key=_key_order):
            entry = entries[key]
            prompt = entry.get(field) if isinstance(entry, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DatasetError(f"{path}: entry {key!r} has no {field!r} text")
            image = None if images is None else images / path.stem / variant / f"{key}.jpg"
            samples.append(
                Sample(prompt, "unsafe", image, path.stem, 0,
                       f"mmsb/{path.stem}/{variant}/{key}", f"mm-safetybench:{variant}")
            )  # fmt: skip
    check_images(samples, f"MM-SafetyBench {variant}")
    return samples
