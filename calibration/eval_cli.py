"""`vlmguard eval` and `vlmguard eval-data` (registered on the main group in vlmguard/cli.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click

from vlmguard.cli_support import CommaChoice, providers_option
from vlmguard.errors import one_line_errors

from .cli import _progress_bars
from .datasets.figstep import SUBSETS as FIGSTEP_SUBSETS
from .datasets.mmsafetybench import VARIANTS as MMSB_VARIANTS
from .datasets.vlguard import SUBSETS as VLGUARD_SUBSETS


def _percent(rate: float | None) -> str:
    """A rate as a percentage, or "-" when undefined."""
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _fired(counts: dict[str, int]) -> str:
    """Guard counts as "detector:flag 3, oh:refusal_path 1"."""
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "-"


def _print_metrics(metrics: dict) -> None:
    """Per category and overall: ASR, DSR, over-defense and which guards fired, as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("category", "unsafe", "ASR", "DSR", "safe", "over-defense"):
        table.add_column(column, justify="left" if column == "category" else "right")
    table.add_column("guards fired (unsafe | safe)")
    rows = [*metrics["categories"].items(), ("overall", metrics["overall"])]
    for name, m in rows:
        table.add_row(
            f"[bold]{name}[/bold]" if name == "overall" else name,
            str(m["n_unsafe"]),
            _percent(m["attack_success_rate"]),
            _percent(m["defense_success_rate"]),
            str(m["n_safe"]),
            _percent(m["over_defense_rate"]),
            f"{_fired(m['guards_fired']['unsafe'])} | {_fired(m['guards_fired']['safe'])}",
        )
    Console(width=160).print(table)


@click.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="Evaluation JSONL: image (optional), prompt, label (safe|unsafe), category, id, source.",
)
@click.option(
    "--json",
    "json_out",
    default=None,
    type=click.Path(path_type=Path),
    help="Write the metrics and every sample's outcome to this JSON file.",
)
@click.option(
    "--max-new-tokens",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest answer, in tokens (generation stops earlier at end of text).",
)
@click.option(
    "--limit", default=None, type=click.IntRange(min=1), help="Evaluate only the first N samples."
)
@click.option(
    "--batch-size",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests per batch.",
)
@click.option(
    "--refusal-phrases",
    default=None,
    type=click.Path(path_type=Path),
    help="Replace the refusal phrase list (GCG's, by default): a text file, one phrase a line.",
)
@click.option("--ignore-case", is_flag=True, help="Match refusal phrases case-insensitively.")
@click.option(
    "--policy",
    "policy_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Guard policy JSON (default: the bundle's policy.json, if any).",
)
@click.option("--no-guard", is_flag=True, help="Every guard neutral: the unguarded baseline.")
@providers_option
@click.option(
    "--text-chars",
    default=300,
    show_default=True,
    type=click.IntRange(min=0),
    help="Answer characters kept per sample in --json.",
)
@one_line_errors
def eval_command(
    bundle: Path,
    data: Path,
    json_out: Path | None,
    max_new_tokens: int,
    limit: int | None,
    batch_size: int,
    refusal_phrases: Path | None,
    ignore_case: bool,
    policy_path: Path | None,
    no_guard: bool,
    providers: str | None,
    text_chars: int,
) -> None:
    """Measure BUNDLE's attack success, defense success and over-defense rates on --data."""
    from vlmguard.runtime.guarded_vlm import GuardedVLM
    from vlmguard.runtime.policy import GuardPolicy

    from .data import read_jsonl
    from .evaluate import eval_document, evaluate
    from .refusal_matcher import RefusalMatcher

    if no_guard and policy_path:
        raise click.UsageError("--no-guard and --policy exclude each other")
    samples = read_jsonl(data)[:limit]  # bad data fails before the bundle loads
    matcher = (
        RefusalMatcher.from_file(refusal_phrases, ignore_case)
        if refusal_phrases
        else RefusalMatcher(ignore_case=ignore_case)
    )
    policy = GuardPolicy.neutral() if no_guard else policy_path
    vlm = GuardedVLM.load(bundle, providers=providers, policy=policy)
    start = time.perf_counter()
    with _progress_bars() as progress:
        outcomes = evaluate(
            vlm, samples, matcher, max_new_tokens, batch_size, text_chars,
            progress=progress("evaluating", len(samples)),
        )  # fmt: skip
    settings = {
        "max_new_tokens": max_new_tokens,
        "limit": limit,
        "batch_size": batch_size,
        "no_guard": no_guard,
        "policy_file": str(policy_path) if policy_path else None,
        "sampling": "greedy",
        "seconds": round(time.perf_counter() - start, 3),
    }
    document = eval_document(vlm, data, samples, outcomes, settings, matcher)
    _print_metrics(document["metrics"])
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        click.echo(f"wrote {json_out}")


@click.group("eval-data")
def eval_data() -> None:
    """Turn local copies of safety benchmarks into evaluation JSONL; render FigStep images."""


def _convert_options(command: Callable) -> Callable:
    """The DIR argument and the options every dataset converter shares."""
    options = [
        click.argument("directory", metavar="DIR", type=click.Path(path_type=Path)),
        click.option(
            "--out", required=True, type=click.Path(path_type=Path), help="JSONL file to write."
        ),
        click.option("--limit", type=click.IntRange(min=1), help="Keep at most N samples in all."),
        click.option(
            "--per-category",
            type=click.IntRange(min=1),
            help="Keep at most N samples per category.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _write(samples: list, out: Path, limit: int | None, per_category: int | None) -> None:
    """Apply the limits, write the JSONL and say what was written."""
    from .data import LABELS
    from .datasets.common import limit_samples, write_jsonl

    kept = limit_samples(samples, limit, per_category)
    write_jsonl(kept, out)
    labels = {label: sum(s.label == label for s in kept) for label in LABELS}
    categories = len({s.category for s in kept})
    click.echo(
        f"wrote {out}: {len(kept)} samples ({labels['unsafe']} unsafe, {labels['safe']} safe) "
        f"in {categories} categories"
    )


@eval_data.command("mmsafetybench")
@_convert_options
@click.option(
    "--variant",
    type=click.Choice(list(MMSB_VARIANTS)),
    default="SD_TYPO",
    show_default=True,
    help="Image variant (text: the text-only baseline, no image).",
)
@click.option("--question-field", default=None, help="Override the question key the variant uses.")
@one_line_errors
def mmsafetybench_command(
    directory: Path,
    out: Path,
    limit: int | None,
    per_category: int | None,
    variant: str,
    question_field: str | None,
) -> None:
    """Convert a local MM-SafetyBench copy.

    \b
    DIR/data/processed_questions/01-Illegal_Activitiy.json ...
    DIR/imgs/01-Illegal_Activitiy/SD_TYPO/0.jpg (also SD/, TYPO/)
    """
    from .datasets.mmsafetybench import read_mmsafetybench

    _write(read_mmsafetybench(directory, variant, question_field), out, limit, per_category)


@eval_data.command("figstep")
@_convert_options
@click.option(
    "--subset",
    type=click.Choice(list(FIGSTEP_SUBSETS)),
    default="SafeBench",
    show_default=True,
)
@click.option(
    "--render-missing",
    is_flag=True,
    help="Render images the copy lacks with FigStep's recipe, beside --out.",
)
@one_line_errors
def figstep_command(
    directory: Path,
    out: Path,
    limit: int | None,
    per_category: int | None,
    subset: str,
    render_missing: bool,
) -> None:
    """Convert a local FigStep/SafeBench copy (the FigStep repository).

    \b
    DIR/data/question/safebench.csv (or SafeBench-Tiny.csv)
    DIR/data/images/SafeBench/query_<dataset>_<category_id>_<task_id>_6.png
    """
    from .datasets.figstep import read_figstep

    render_dir = out.parent / f"{out.stem}_images" if render_missing else None
    _write(read_figstep(directory, subset, render_dir), out, limit, per_category)


@eval_data.command("vlguard")
@_convert_options
@click.option(
    "--subsets",
    type=CommaChoice(VLGUARD_SUBSETS, "VLGuard subset"),
    default="unsafes,safe_unsafes,safe_safes",
    show_default=True,
    help="Comma-separated VLGuard subsets (each becomes a category).",
)
@one_line_errors
def vlguard_command(
    directory: Path, out: Path, limit: int | None, per_category: int | None, subsets: str
) -> None:
    """Convert a local copy of VLGuard's test set.

    \b
    DIR/test.json
    DIR/test/<image> (test.zip unpacked)
    """
    from .datasets.vlguard import read_vlguard

    chosen = [s.strip() for s in subsets.split(",") if s.strip()]
    _write(read_vlguard(directory, chosen), out, limit, per_category)


@eval_data.command("jailbreakv")
@_convert_options
@click.option("--mini", is_flag=True, help="The 280-row mini set (mini_JailBreakV_28K.csv).")
@one_line_errors
def jailbreakv_command(
    directory: Path, out: Path, limit: int | None, per_category: int | None, mini: bool
) -> None:
    """Convert a local JailBreakV-28K copy.

    \b
    DIR/JailBreakV_28K/JailBreakV_28K.csv (mini_JailBreakV_28K.csv with --mini)
    DIR/JailBreakV_28K/<image_path> (llm_transfer_attack/, query_related/, figstep/)
    """
    from .datasets.jailbreakv import read_jailbreakv

    _write(read_jailbreakv(directory, mini), out, limit, per_category)


@eval_data.command("render-figstep")
@click.option("--text", "text", default=None, help="One instruction to typeset into --out (PNG).")
@click.option(
    "--jsonl",
    "jsonl",
    default=None,
    type=click.Path(path_type=Path),
    help="Typeset every prompt of this JSONL; --out is then the new JSONL.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Image or JSONL.")
@click.option("--font", default=None, type=click.Path(path_type=Path), help="A TTF font file.")
@click.option(
    "--font-size",
    default=80,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest font size.",
)
@one_line_errors
def render_figstep_command(
    text: str | None, jsonl: Path | None, out: Path, font: Path | None, font_size: int
) -> None:
    """Render FigStep-style typographic images (one, or for every prompt of a JSONL).

    A white 760x760 image: the text wrapped at 15 characters, then an empty list "1. 2. 3.".
    With --jsonl each prompt becomes an image in OUT_images/ and the text prompt becomes
    FigStep's benign one.
    """
    from .datasets.typography import render_figstep, typeset_jsonl

    if (text is None) == (jsonl is None):
        raise click.UsageError("give exactly one of --text and --jsonl")
    if font is not None and not font.is_file():
        raise click.BadParameter(f"{font} does not exist", param_hint="--font")
    if text is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        render_figstep(text, font_size=font_size, font=font).save(out)
        click.echo(f"wrote {out}")
        return
    written = typeset_jsonl(jsonl, out, font_size=font_size, font=font)
    click.echo(f"wrote {out}: {written} samples with typographic images")
