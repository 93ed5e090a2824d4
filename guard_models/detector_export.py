"""Export a CLIP/SigLIP checkpoint plus a concept bank to one ONNX safety-detector graph.

The graph maps `pixel_values` to the image embedding, the patch embeddings, per-category
global cosines, per-patch OT scores and the two image-level scores (see `ot_head`). The
concept bank is embedded by the text tower here and stored in the graph as constants, so
the runtime needs neither the text tower nor a tokenizer. Offline half (torch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmguard.runtime.detector_variants import FP16, FP32, VARIANT_FILES

from .concepts import ConceptBank, load_concept_bank
from .ot_head import DetectorHead, OTParams
from .quantize import parse_quantize
from .sources import resolve_detector_source
from .towers import Tower, load_tower

__all__ = [
    "DetectorGraph",
    "DEFAULT_THRESHOLDS",
    "OUTPUT_NAMES",
    "build_detector_graph",
    "export_detector",
    "export_onnx",
    "write_detector_dir",
]

OUTPUT_NAMES = [
    "det_image_embeds",
    "det_patch_embeds",
    "det_global_cosine",
    "det_patch_ot_scores",
    "det_patch_mass",
    "det_score_global",
    "det_score_ot",
]

# Thresholds for a checkpoint nobody calibrated: ETA's CLIP cosine threshold and GuardAlign's
# tau = 0.42 on transport cost (0.58 on our 1 - cost scale). Calibration should replace them.
DEFAULT_THRESHOLDS = {"global": 0.16, "ot": 0.58, "method": "ot"}
OPSET = 18


class DetectorGraph(nn.Module):
    """The whole detector: vision tower, then the concept-bank head."""

    def __init__(self, tower: Tower, head: DetectorHead) -> None:
        """Combine a tower and a head."""
        super().__init__()
        self.tower = tower
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All detector outputs, in OUTPUT_NAMES order (float32 whatever the tower's dtype)."""
        dtype = next(self.tower.parameters()).dtype
        image_embeds, patch_embeds = self.tower(pixel_values.to(dtype))
        image_embeds, patch_embeds = image_embeds.float(), patch_embeds.float()
        scores = self.head(image_embeds, patch_embeds)
        return (image_embeds, patch_embeds, *(scores[name] for name in OUTPUT_NAMES[2:]))


def build_detector_graph(
    tower: Tower, bank: ConceptBank, params: OTParams | None = None
) -> DetectorGraph:
    """Embed the concept bank with the tower's text encoder and build the detector module."""
    params = params or OTParams()
    embeds = [tower.embed_texts(list(category.variants)) for category in bank.categories]
    head = DetectorHead(embeds, params, logit_scale=tower.logit_scale)
    return DetectorGraph(tower, head).eval()


def export_onnx(graph: DetectorGraph, path: Path, half_tower: bool = False) -> None:
    """Trace the detector to ONNX with a dynamic batch axis; optionally an fp16 tower."""
    if half_tower:  # fp16 for CUDA: the tower in half, the head (Sinkhorn) stays fp32
        graph = DetectorGraph(copy.deepcopy(graph.tower).half(), graph.head)
    side = graph.tower.image_size()
    example = torch.zeros(2, 3, side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: "batch"} for name in ["pixel_values", *OUTPUT_NAMES]}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about HF's shape checks
        # turning into constants (the image size is fixed per detector, so that is intended).
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _io_spec(graph: DetectorGraph, bank: ConceptBank) -> dict[str, Any]:
    """Names, shapes and dtypes of the graph's inputs and outputs."""
    side = graph.tower.image_size()
    patches = graph.tower.patch_grid[0] * graph.tower.patch_grid[1]
    dim = int(graph.head.categories.shape[1])
    categories = len(bank.categories)
    shapes = {
        "det_image_embeds": ["batch", dim],
        "det_patch_embeds": ["batch", patches, dim],
        "det_global_cosine": ["batch", categories],
        "det_patch_ot_scores": ["batch", patches, categories],
        "det_patch_mass": ["batch", patches],
        "det_score_global": ["batch"],
        "det_score_ot": ["batch"],
    }
    return {
        "inputs": {"pixel_values": {"shape": ["batch", 3, side, side], "dtype": "float32"}},
        "outputs": {name: {"shape": shapes[name], "dtype": "float32"} for name in OUTPUT_NAMES},
    }


def export_detector(
    source: str,
    out_dir: str | Path,
    concepts: str | Path | None = None,
    quantize: str | Sequence[str] = "int8",
    params: OTParams | None = None,
    calibration_images: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Export a detector into out_dir/onnx/ and return its manifest (guard_config 'detector')."""
    variants = parse_quantize(quantize)
    params = params or OTParams()
    resolved = resolve_detector_source(source)
    bank = load_concept_bank(concepts if concepts is not None else resolved.concepts)
    tower = load_tower(str(resolved.checkpoint))
    graph = build_detector_graph(tower, bank, params)
    out_dir = Path(out_dir)
    fp32_path = out_dir / VARIANT_FILES[FP32]
    export_onnx(graph, fp32_path)
    files = {FP32: VARIANT_FILES[FP32]}
    for variant in variants:
        target = out_dir / VARIANT_FILES[variant]
        if variant == FP16:
            export_onnx(graph, target, half_tower=True)
        else:
            from .quantize import quantize_variant

            quantize_variant(
                variant, fp32_path, target, tower.processor_config, calibration_images
            )
        files[variant] = VARIANT_FILES[variant]
    thresholds = dict(resolved.thresholds or DEFAULT_THRESHOLDS)
    return {
        "format": 1,
        "source": resolved.name,
        "model_type": tower.model_type,
        "files": files,
        "sha256": {variant: _sha256(out_dir / name) for variant, name in files.items()},
        **_io_spec(graph, bank),
        "patch_grid": list(tower.patch_grid),
        "preprocessor": tower.processor_config,
        "concepts": bank.to_json(),
        "ot": {**params.to_json(), "category_logit_scale": graph.head.scale},
        "thresholds": thresholds,
        "exporter": {"torch": torch.__version__, "opset": OPSET, "exporter": "torchscript"},
    }


def write_detector_dir(manifest: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a standalone detector directory's detector_config.json; return its path."""
    path = Path(out_dir) / "detector_config.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
