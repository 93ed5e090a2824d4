"""Export a CLIP/SigLIP checkpoint plus a concept bank to one ONNX safety-detector graph.

The graph maps `pixel_values` to the image embedding, the patch embeddings, per-category
global cosines, per-patch OT scores and the two image-level scores (see `ot_head`). The
concept bank is embedded by the text tower here and stored in the graph as constants, so
the runtime needs neither the text tower nor a tokenizer. Every variant's graph comes from
the project's one ONNX export path (export/onnx_io.export_onnx, torch.onnx dynamo), weights
inline, nodes named by module scope. Offline half (torch).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from vlmguard.export.onnx_io import TensorSpec
from vlmguard.export.onnx_io import export_onnx as export_graph
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

    def flat_forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The positional-tensor entry point export_onnx traces."""
        return self.forward(pixel_values)


def build_detector_graph(
    tower: Tower, bank: ConceptBank, params: OTParams | None = None
) -> DetectorGraph:
    """Embed the concept bank with the tower's text encoder and build the detector module."""
    params = params or OTParams()
    embeds = [tower.embed_texts(list(category.variants)) for category in bank.categories]
    head = DetectorHead(embeds, params, logit_scale=tower.logit_scale)
    return DetectorGraph(tower, head).eval()


def tensor_specs(graph: DetectorGraph) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's input and output specs: names, dims (batch dynamic) and dtypes."""
    side = graph.tower.image_size()
    patches = graph.tower.patch_grid[0] * graph.tower.patch_grid[1]
    categories, dim = (int(n) for n in graph.head.categories.shape)
    dims: dict[str, tuple[str | int, ...]] = {
        "det_image_embeds": ("batch", dim),
        "det_patch_embeds": ("batch", patches, dim),
        "det_global_cosine": ("batch", categories),
        "det_patch_ot_scores": ("batch", patches, categories),
        "det_patch_mass": ("batch", patches),
        "det_score_global": ("batch",),
        "det_score_ot": ("batch",),
    }
    inputs = [TensorSpec("pixel_values", ("batch", 3, side, side), "float32")]
    return inputs, [TensorSpec(name, dims[name], "float32") for name in OUTPUT_NAMES]


def export_onnx(graph: DetectorGraph, path: Path, half_tower: bool = False) -> Path:
    """Export the detector to one ONNX file with a dynamic batch axis; optionally an fp16 tower."""
    if half_tower:  # fp16 for CUDA: the tower in half, the head (Sinkhorn) stays fp32
        graph = DetectorGraph(copy.deepcopy(graph.tower).half(), graph.head)
    inputs, outputs = tensor_specs(graph)
    example = torch.zeros(2, 3, *inputs[0].dims[2:])
    with torch.no_grad():
        return export_graph(
            graph, [example], inputs, outputs, path, external_data=False, scope_node_names=True
        )


def _opset(path: Path) -> int:
    """The default-domain opset an exported graph uses."""
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _io_spec(graph: DetectorGraph) -> dict[str, Any]:
    """Names, shapes and dtypes of the graph's inputs and outputs, for the manifest."""
    inputs, outputs = tensor_specs(graph)
    record = {"inputs": inputs, "outputs": outputs}
    return {
        key: {spec.name: {"shape": list(spec.dims), "dtype": spec.dtype} for spec in specs}
        for key, specs in record.items()
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

            quantize_variant(variant, fp32_path, target, tower.processor_config, calibration_images)
        files[variant] = VARIANT_FILES[variant]
    thresholds = dict(resolved.thresholds or DEFAULT_THRESHOLDS)
    return {
        "format": 1,
        "source": resolved.name,
        "model_type": tower.model_type,
        "files": files,
        "sha256": {variant: _sha256(out_dir / name) for variant, name in files.items()},
        **_io_spec(graph),
        "patch_grid": list(tower.patch_grid),
        "preprocessor": tower.processor_config,
        "concepts": bank.to_json(),
        "ot": {**params.to_json(), "category_logit_scale": graph.head.scale},
        "thresholds": thresholds,
        "exporter": {"torch": torch.__version__, "opset": _opset(fp32_path), "exporter": "dynamo"},
    }


def write_detector_dir(manifest: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a standalone detector directory's detector_config.json; return its path."""
    path = Path(out_dir) / "detector_config.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
