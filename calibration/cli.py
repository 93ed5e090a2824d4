"""`vlmguard calibrate`: the click command (registered on the main group in vlmguard/cli.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from vlmguard.errors import one_line_errors, require_extra


@contextmanager
def _progress_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A rich progress display on stderr, as a progress factory."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:

        def factory(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        yield factory


def _bundle_detector(bundle: Path | None) -> Path | None:
    """The bundle itself as the detector source when its guard_config.json carries one."""
    if bundle is None or not (bundle / "guard_config.json").is_file():
        return None
    manifest = json.loads((bundle / "guard_config.json").read_text())
    return bundle if isinstance(manifest.get("detector"), dict) else None


def _carries_ptr(bundle: Path | None) -> bool:
    """Whether the bundle's decoder carries SafePTR (assumed without a bundle: the default)."""
    if bundle is None:
        return True
    from vlmguard.manifest import Manifest

    return "ptr" in Manifest.read(bundle).defenses


@click.command("calibrate")
@click.argument("source")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path),
    help="Labelled JSONL: image (optional), prompt, label (safe|unsafe), category.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Policy JSON file to write.",
)
@click.option(
    "--target-fpr",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="False-positive rate on safe samples the detector thresholds aim at.",
)
@click.option(
    "--holdout",
    default=0.3,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Share of each label held out for the reported TPR/FPR.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the held-out split.")
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples per forward batch (the head sweep runs batch x heads rows).",
)
@click.option(
    "--bundle",
    default=None,
    type=click.Path(path_type=Path),
    help="Also write the policy into this bundle (re-exporting its decoder if needed).",
)
@click.option(
    "--assume-same-source",
    is_flag=True,
    help="With --bundle: take SOURCE as the bundle's model when the bundle records no source "
    "identity (exported before vlmguard recorded one); otherwise such a bundle is refused.",
)
@click.option(
    "--detector",
    default=None,
    help="Detector directory, bundle or 'default' for the detector thresholds "
    "(default: the bundle's detector, if it has one).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Torch device for the model: cpu, cuda or cuda:N (an open set, so not a fixed choice).",
)
@click.option(
    "--report",
    "report",
    default=None,
    type=click.Path(path_type=Path),
    help="Directory for the heatmap, ROC curves and summary.md.",
)
@one_line_errors
def calibrate_command(
    source: str,
    data: Path,
    out: Path,
    target_fpr: float,
    holdout: float,
    seed: int,
    batch_size: int,
    bundle: Path | None,
    assume_same_source: bool,
    detector: str | None,
    device: str,
    report: Path | None,
) -> None:
    """Calibrate SOURCE's guards (Oh head, SafePTR window, GuardAlign strength, thresholds)."""
    require_extra("export")
    if report is not None:
        require_extra("plot")  # before the run, not after it
    import torch

    from vlmguard.quiet import quiet_offline_tools

    from .data import read_samples
    from .policy_writer import apply_to_bundle, write_policy
    from .run import calibrate, check_device

    quiet_offline_tools()
    check_device(device)
    read_samples(data)  # bad data fails before the model loads (a foreign bundle too: calibrate)
    with torch.no_grad(), _progress_bars() as progress:
        result = calibrate(
            source, data, target_fpr=target_fpr, holdout=holdout, seed=seed,
            batch_size=batch_size, detector=detector or _bundle_detector(bundle),
            oh_with_ptr=_carries_ptr(bundle), device=device, progress=progress, bundle=bundle,
            assume_same_source=assume_same_source,
        )  # fmt: skip
    write_policy(out, result.document)
    cal = result.document["calibration"]
    oh, off = cal["oh"], cal["observe_only"]
    threshold = "observe-only" if "oh" in off else f"threshold {oh['threshold_degrees']:.4f} deg"
    ptr = "observe-only" if "ptr" in off else "K {}".format(cal["ptr"]["k_fraction"])
    align = "observe-only" if "align" in off else f"gamma {cal['align']['gamma']}"
    click.echo(
        f"oh: layer {oh['layer']} head {oh['head']} {threshold}; "
        "ptr window [{}, {}) {}; ".format(*cal["ptr"]["window"], ptr)
        + "align {} on layers [{}, {}); ".format(align, *cal["align"]["layers"])
        + f"{cal['timings_s']['total']:.1f} s"
    )
    for guard, reason in off.items():
        click.echo(f"{guard}: left observe-only: {reason}")
    click.echo(f"wrote {out}")
    if report is not None:
        from .report import write_report

        click.echo(f"wrote {write_report(result, report)}")
    if bundle is not None:
        reexported = apply_to_bundle(
            bundle, result.document, source, on_step=click.echo,
            assume_same_source=assume_same_source,
        )  # fmt: skip
        note = " (decoder re-exported)" if reexported else ""
        click.echo(f"wrote the policy into {bundle}{note}")
