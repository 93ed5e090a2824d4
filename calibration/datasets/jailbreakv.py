"""JailBreakV-28K (Luo et al., COLM 2024; huggingface.co/datasets/JailbreakV-28K/JailBreakV-28k).

Layout mirrored (the dataset repository):

    DIR/JailBreakV_28K/JailBreakV_28K.csv        (DIR may also be the JailBreakV_28K folder)
    DIR/JailBreakV_28K/mini_JailBreakV_28K.csv   (the 280-row mini set)
        columns: id, jailbreak_query, redteam_query, format, policy, image_path, from,
                 selected_mini, transfer_from_llm
    DIR/JailBreakV_28K/<image_path>              (llm_transfer_attack/, query_related/, figstep/)

Every row is unsafe: the prompt is `jailbreak_query` with its image, the category the row's
`policy` (16 safety policies), the source "jailbreakv-28k:<format>" (Template, Persuade, Logic,
FigStep, Query-relevant, ...). Without the mini CSV, `mini` keeps rows whose `selected_mini` is
true.
"""

from __future__ import annotations

from pathlib import Path

from ..data import Sample
from .common import DatasetError, check_images, csv_rows, require_dir

FOLDER, FULL, MINI = "JailBreakV_28K", "JailBreakV_28K.csv", "mini_JailBreakV_28K.csv"
COLUMNS = ("id", "jailbreak_query", "format", "policy", "image_path")


def _table(root: Path, mini: bool) -> tuple[Path, bool]:
    """The CSV to read and whether its rows still need the selected_mini filter."""
    for folder in (root / FOLDER, root):
        if mini and (folder / MINI).is_file():
            return folder / MINI, False
        if (folder / FULL).is_file():
            return folder / FULL, mini
    raise DatasetError(
        f"{root} is not in the expected layout: no {FOLDER}/{FULL} (or {MINI}) found"
    )


def read_jailbreakv(root: str | Path, mini: bool = False) -> list[Sample]:
    """JailBreakV-28K's rows (or the mini set's) as unsafe samples with their images."""
    table, filter_mini = _table(require_dir(root), mini)
    columns = (*COLUMNS, "selected_mini") if filter_mini else COLUMNS
    samples = []
    for line, row in csv_rows(table, columns):
        if filter_mini and row["selected_mini"].strip().lower() not in ("true", "1"):
            continue
        prompt = (row["jailbreak_query"] or "").strip()
        if not prompt or not (row["image_path"] or "").strip():
            raise DatasetError(f"{table}: line {line} has an empty jailbreak_query or image_path")
        samples.append(
            Sample(prompt, "unsafe", table.parent / row["image_path"].strip(), row["policy"], 0,
                   f"jailbreakv/{row['id']}", f"jailbreakv-28k:{row['format']}")
        )  # fmt: skip
    if not samples:
        raise DatasetError(f"{table} holds no rows{' selected for mini' if filter_mini else ''}")
    check_images(samples, "JailBreakV-28K")
    return samples
