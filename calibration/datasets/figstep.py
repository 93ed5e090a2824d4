"""FigStep / SafeBench (Gong et al., AAAI 2025; github.com/ThuCCSLab/FigStep) -> samples.

Layout mirrored (the FigStep repository):

    DIR/data/question/safebench.csv          (SafeBench-Tiny.csv for the 50-question subset)
        columns: dataset, category_id, task_id, category_name, question, instruction
    DIR/data/images/SafeBench/query_<dataset>_<category_id>_<task_id>_6.png
    DIR/data/images/SafeBench-Tiny/...        (same names)

Each row is an unsafe sample: FigStep's typographic image of the instruction with the fixed
benign text prompt (`FIGSTEP_PROMPT`); the category is `category_name`. Missing images (the
repository ships only SafeBench-Tiny's) can be rendered with FigStep's recipe (`render_dir`).
"""

from __future__ import annotations

from pathlib import Path

from ..data import Sample
from .common import DatasetError, check_images, csv_rows, first_existing, require_dir
from .typography import FIGSTEP_PROMPT, render_figstep

SUBSETS = {"SafeBench": "safebench.csv", "SafeBench-Tiny": "SafeBench-Tiny.csv"}
COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")


def read_figstep(
    root: str | Path, subset: str = "SafeBench", render_dir: str | Path | None = None
) -> list[Sample]:
    """Every SafeBench question as FigStep's image + benign prompt (unsafe samples)."""
    if subset not in SUBSETS:
        raise DatasetError(f"unknown FigStep subset {subset!r}; use {', '.join(SUBSETS)}")
    root = require_dir(root)
    layout = f"data/question/{SUBSETS[subset]} and data/images/{subset}/query_*_6.png"
    table = first_existing(root, [f"data/question/{SUBSETS[subset]}"], layout)
    images = root / "data" / "images" / subset
    samples = []
    for line, row in csv_rows(table, COLUMNS):
        instruction = (row["instruction"] or "").strip()
        if not instruction:
            raise DatasetError(f"{table}: line {line} has an empty instruction")
        name = f"query_{row['dataset']}_{row['category_id']}_{row['task_id']}_6.png"
        image = images / name
        if not image.is_file() and render_dir is not None:
            image = Path(render_dir) / name
            if not image.is_file():
                image.parent.mkdir(parents=True, exist_ok=True)
                render_figstep(instruction).save(image)
        samples.append(
            Sample(FIGSTEP_PROMPT, "unsafe", image, row["category_name"], 0,
                   f"figstep/{name.removesuffix('_6.png')}", f"figstep:{subset}")
        )  # fmt: skip
    if not samples:
        raise DatasetError(f"{table} holds no rows")
    try:
        check_images(samples, f"FigStep {subset}")
    except DatasetError as err:
        raise DatasetError(f"{err} (render them with --render-missing)") from None
    return samples
