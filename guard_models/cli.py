"""Click commands for the safety detector: `detect` and `detector export`.

The main `vlmguard` group registers both: `vlmguard detect` is a user command (score images),
`vlmguard detector export` a developer tool (build a detector; `vlmguard export --detector`
is the usual way a bundle gets one). `detect` stays torch-free; `detector export` needs the
export extra and imports the exporter lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from vlmguard.cli_support import CommaChoice, providers_option
from vlmguard.errors import InputNotFoundError, one_line_errors, require_extra
from vlmguard.staging import staged_directory

from .quantize import QUANTIZE_MODES, parse_quantize

__all__ = ["detector", "detect"]


@click.group("detector")
def detector() -> None:
    """Build CLIP/SigLIP safety detectors (score images with `vlmguard detect`)."""


@detector.command("export")
@click.argument("source")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write detector_config.json and onnx/ into.",
)
@click.option(
    "--concepts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Concept bank JSON (default: the packaged bank, or the detector's own).",
)
@click.option(
    "--quantize",
    type=CommaChoice(QUANTIZE_MODES, "quantize mode", none_alone=False),
    default="int8",
    show_default=True,
    help="Extra variants besides fp32: int8 (CPU), qdq (TensorRT), fp16 (CUDA).",
)
@click.option(
    "--calibration-images",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of images to calibrate qdq (default: synthetic).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@one_line_errors
def export_command(
    source: str,
    out_dir: Path,
    concepts: Path | None,
    quantize: str,
    calibration_images: Path | None,
    force: bool,
) -> None:
    """Export SOURCE (a CLIP/SigLIP checkpoint, hub id in the cache, or `default`) to ONNX."""

    require_extra("export")
    from vlmguard.export.exporter import check_output_dir  # the bundle export's own refusal
    from vlmguard.quiet import quiet_offline_tools

    parse_quantize(quantize)
    images = _image_files(calibration_images) if calibration_images else None
    check_output_dir(out_dir, force)  # before any export work, as `vlmguard export`
    quiet_offline_tools()
    from .detector_export import export_detector, write_detector_dir

    with staged_directory(out_dir) as staging:  # a failed export leaves the old one
        manifest = export_detector(source, staging, concepts, quantize, None, images)
        write_detector_dir(manifest, staging)
    path = out_dir / "detector_config.json"
    click.echo(
        f"wrote {path} ({', '.join(manifest['files'])}; "
        f"{len(manifest['concepts'])} concept categories)"
    )


def _image_files(directory: Path) -> list[Path]:
    """Image files in a directory, sorted."""
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise InputNotFoundError(f"no images in {directory}; give PNG or JPEG calibration images.")
    return files


def _heatmap_path(base: Path, index: int, count: int) -> Path:
    """The heatmap file for image `index`: the given name, numbered when there are several."""
    return base if count == 1 else base.with_name(f"{base.stem}_{index}{base.suffix or '.png'}")


@click.command("detect")
@click.argument("detector_or_bundle")
@click.argument("images", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
@click.option(
    "--heatmap",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a per-patch OT score heatmap PNG (numbered for several images).",
)
@providers_option
@click.option(
    "--variant",
    type=click.Choice(["fp32", "int8", "qdq", "fp16"]),
    default=None,
    help="Force a graph variant instead of picking one for the providers.",
)
@click.option(
    "--method",
    type=click.Choice(["ot", "global", "any"]),
    default=None,
    help="Which score decides (default: the detector's policy).",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="How many concepts to report.",
)
@one_line_errors
def detect(
    detector_or_bundle: str,
    images: tuple[str, ...],
    as_json: bool,
    heatmap: Path | None,
    providers: str | None,
    variant: str | None,
    method: str | None,
    top_k: int,
) -> None:
    """Score IMAGES with a detector directory, a bundle, or `default`."""
    from vlmguard.runtime.detector import SafetyDetector
    from vlmguard.runtime.detector_heatmap import render_heatmap
    from vlmguard.runtime.image_preprocess import model_view
    from vlmguard.runtime.providers import resolve_providers

    model = SafetyDetector.load(
        detector_or_bundle,
        resolve_providers(providers),
        variant,
        {"method": method} if method else None,
    )
    results = []
    for index, image in enumerate(images):
        detection = model.detect(image, name=image, top_k=top_k)
        record = detection.to_json()
        if heatmap is not None:
            path = _heatmap_path(heatmap, index, len(images))
            render_heatmap(
                model_view(image, model.preprocessor),
                detection.patch_scores,
                model.thresholds["ot"],
                path,
            )
            record["heatmap"] = str(path)
        results.append(record)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for record in results:
        click.echo(_summary(record))


def _summary(record: dict) -> str:
    """One human-readable line per image."""
    verdict = "UNSAFE" if record["unsafe"] else "safe"
    key = "global" if record["method"] == "global" else "ot"
    concepts = ", ".join(f"{c['name']} {c[key]:.3f}" for c in record["top_concepts"])
    line = (
        f"{record['image']}: {verdict} (ot {record['score_ot']:.3f} / "
        f"{record['thresholds']['ot']:.3f}, global {record['score_global']:.3f} / "
        f"{record['thresholds']['global']:.3f}, method {record['method']}) top: {concepts}"
    )
    return line + (f" heatmap: {record['heatmap']}" if "heatmap" in record else "")
