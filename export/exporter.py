"""`export_bundle`: a Hugging Face checkpoint in, a guarded ONNX bundle out.

The shared machinery for every family: the family (`export/families/`) says how to take the
model apart, the guard descriptions (`vlmguard/guards.py`) what the decoder carries; this module
stages the graphs, the processing files and guard_config.json in a directory beside the output
and renames it into place at the end, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vlmguard import __version__
from vlmguard.errors import OutputExistsError, UsageError
from vlmguard.guards import GuardSettings, TensorSpec, resolve_settings, settings_record
from vlmguard.manifest import GraphRecord, Manifest, write_manifest
from vlmguard.staging import staged_directory

from .families import family_for
from .graphs import GraphPlan, decoder_plan, embed_plan, vision_plan
from .guards.ptr import ptr_reference
from .onnx_io import convert_to_fp16, export_onnx
from .source import copy_processing_files, load_source, resolve_source, source_identity

GRAPH_FILES = {  # fp32 names; fp16 bundles use the transformers.js suffix, e.g. *_fp16.onnx
    "vision_encoder": "onnx/vision_encoder.onnx",
    "embed_tokens": "onnx/embed_tokens.onnx",
    "decoder": "onnx/decoder_model_merged.onnx",
}


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output directory unless the user asked to replace it."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} is not empty; pass --force to replace it")


def _graph_record(plan: GraphPlan, file: str, float_type: str) -> GraphRecord:
    """A graph's entry in guard_config.json, with float tensors in the bundle's precision."""

    def typed(spec: TensorSpec) -> TensorSpec:
        return replace(spec, dtype=float_type) if spec.dtype == "float32" else spec

    return GraphRecord(
        file, tuple(typed(s) for s in plan.inputs), tuple(typed(s) for s in plan.outputs)
    )


def export_bundle(
    source: str | Path,
    out: str | Path,
    defenses: frozenset[str] = frozenset({"oh", "ptr", "align"}),
    dtype: str = "fp32",
    *,
    ptr_window: tuple[int, int] | None = None,
    oh_layer: int | None = None,
    oh_head: int | None = None,
    detector: str | None = None,
    detector_quantize: str = "int8",
    force: bool = False,
    on_step: Callable[[str], None] = lambda step: None,
) -> Path:
    """Export a LLaVA-family checkpoint to a guarded ONNX bundle directory and return its path.

    `detector` (a CLIP/SigLIP checkpoint, a model id in the cache, or `default`) adds the
    safety detector graphs as onnx/safety_detector*.onnx with a "detector" manifest entry.
    """
    if dtype not in ("fp32", "fp16"):
        raise UsageError(f"--dtype {dtype} is not supported; choose fp32 or fp16")
    float_type = {"fp32": "float32", "fp16": "float16"}[dtype]
    out = Path(out)
    check_output_dir(out, force)
    source_dir = resolve_source(str(source))
    on_step(f"loading {source_dir}")
    loaded = load_source(source_dir)
    config = loaded.model.config
    spec = family_for(config)
    text = config.text_config
    settings: GuardSettings = resolve_settings(
        defenses, text.num_hidden_layers, text.num_attention_heads, ptr_window, oh_layer, oh_head
    )
    reference = (
        ptr_reference(spec, loaded.model, loaded.tokenizer, settings.ptr_window[0])
        if settings.ptr
        else None
    )
    with staged_directory(out) as staging:
        graphs = {}
        plans = {
            "vision_encoder": lambda: vision_plan(spec, loaded.model),
            "embed_tokens": lambda: embed_plan(spec, loaded.model),
            "decoder": lambda: decoder_plan(spec, loaded.model, settings, reference),
        }
        for role, make_plan in plans.items():
            on_step(f"exporting {GRAPH_FILES[role]}")
            plan = make_plan()
            path = staging / GRAPH_FILES[role]
            export_onnx(plan.module, plan.example, plan.inputs, plan.outputs, path)
            if float_type == "float16":
                on_step(f"converting {GRAPH_FILES[role]} to fp16")
                path = convert_to_fp16(path)
            graphs[role] = _graph_record(plan, path.relative_to(staging).as_posix(), float_type)
        detector_record = None
        if detector is not None:
            from vlmguard.guard_models.detector_export import export_detector

            on_step(f"exporting the safety detector from {detector}")
            detector_record = export_detector(detector, staging, quantize=detector_quantize)
        on_step("copying tokenizer, processor and chat template")
        special_tokens = copy_processing_files(loaded, staging)
        on_step("hashing files into guard_config.json")
        manifest = Manifest(
            model=spec.model_record(config),
            special_tokens=special_tokens,
            graphs=graphs,
            guards=settings_record(settings, text.num_hidden_layers),
            dtype=float_type,
            source=str(source),
            source_identity=source_identity(source_dir),
            vlmguard_version=__version__,
            created_unix=int(time.time()),
            detector=detector_record,
        )
        write_manifest(staging, manifest.to_json())
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    return out
