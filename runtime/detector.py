"""Run an exported safety detector with ONNX Runtime: scores, verdict, top concepts, patch map.

Online half: numpy, Pillow and onnxruntime only. A detector lives either in a standalone
directory (`detector_config.json` + `onnx/`, written by `vlmguard detector export`), in a
model bundle (`guard_config.json` with a "detector" entry), or is the packaged `default`
(runtime/data/default_detector/, trained and exported by guard_models/train_default.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vlmguard.errors import VlmguardError
from vlmguard.integrity import verify_bundle
from vlmguard.manifest import read_manifest
from vlmguard.runtime.detector_variants import pick_variant
from vlmguard.runtime.image_preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageInput,
    preprocess_image,
)
from vlmguard.runtime.providers import create_session

__all__ = [
    "DEFAULT_NAME",
    "METHODS",
    "DetectorNotFoundError",
    "DetectorRunError",
    "UnknownDetectorMethodError",
    "Detection",
    "SafetyDetector",
    "default_detector_dir",
    "find_detector_manifest",
]

DEFAULT_NAME = "default"
METHODS = ("ot", "global", "any")


class DetectorNotFoundError(VlmguardError, FileNotFoundError):
    """A path is neither an exported detector directory nor a bundle with a detector."""


class DetectorRunError(VlmguardError, ValueError):
    """ONNX Runtime could not load or run a detector graph."""


class UnknownDetectorMethodError(VlmguardError, ValueError):
    """A detector policy names a deciding method other than ot, global or any."""


def default_detector_dir() -> Path:
    """The packaged directory of the default detector (graphs, manifest and their sources)."""
    return Path(str(resources.files("vlmguard.runtime").joinpath("data/default_detector")))


@dataclass
class Detection:
    """The detector's answer for one image."""

    image: str
    unsafe: bool
    score_global: float
    score_ot: float
    method: str
    thresholds: dict[str, float]
    top_concepts: list[dict[str, Any]]
    patch_scores: np.ndarray = field(repr=False)  # [grid_h, grid_w], max over categories
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data for `--json` output and reports."""
        return {
            "image": self.image,
            "unsafe": self.unsafe,
            "score_global": self.score_global,
            "score_ot": self.score_ot,
            "method": self.method,
            "thresholds": self.thresholds,
            "top_concepts": self.top_concepts,
            "patch_scores": np.round(self.patch_scores, 5).tolist(),
            "reason": self.reason,
        }


def find_detector_manifest(source: str | Path) -> tuple[dict[str, Any], Path]:
    """Find the manifest and root directory of a detector dir, a bundle, or `default`."""
    root = default_detector_dir() if str(source) == DEFAULT_NAME else Path(source)
    standalone, bundle = root / "detector_config.json", root / "guard_config.json"
    if standalone.is_file():
        return json.loads(standalone.read_text()), root
    if bundle.is_file():  # a bundle's files are checked against its inventory, as at load
        config = read_manifest(root)
        verify_bundle(root, manifest=config)
        if isinstance(config.get("detector"), dict):
            return config["detector"], root
        raise DetectorNotFoundError(
            f"{root} is a bundle without a safety detector; export it with --detector."
        )
    raise DetectorNotFoundError(
        f"{source} is not an exported detector or bundle (no detector_config.json or "
        "guard_config.json); run `vlmguard detector export` first."
    )


class SafetyDetector:
    """An ONNX Runtime session over one detector graph plus its manifest."""

    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # detect() refuses larger images

    def __init__(
        self,
        manifest: dict[str, Any],
        root: Path,
        providers: Sequence[str] | None = None,
        variant: str | None = None,
        thresholds: dict[str, Any] | None = None,
    ) -> None:
        """Open the variant that fits the providers (or the one named) for a manifest."""

        self.manifest = manifest
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.variant = variant or pick_variant(self.providers, manifest["files"])
        if self.variant not in manifest["files"]:
            raise DetectorNotFoundError(
                f"variant '{self.variant}' was not exported; have {sorted(manifest['files'])}."
            )
        self.path = root / manifest["files"][self.variant]
        if not self.path.is_file():
            raise DetectorNotFoundError(f"detector graph missing: {self.path}; re-export it.")
        self.thresholds = {**manifest["thresholds"], **(thresholds or {})}
        if self.thresholds.get("method", "ot") not in METHODS:
            raise UnknownDetectorMethodError(
                f"unknown detector method {self.thresholds['method']!r}; use one of {METHODS}."
            )
        self.concept_names = [concept["name"] for concept in manifest["concepts"]]
        self.grid = tuple(manifest["patch_grid"])
        self.session = create_session(self.path, self.providers, [{}] * len(self.providers))
        self.output_names = [output.name for output in self.session.get_outputs()]

    @classmethod
    def load(
        cls,
        source: str | Path = DEFAULT_NAME,
        providers: Sequence[str] | None = None,
        variant: str | None = None,
        thresholds: dict[str, Any] | None = None,
    ) -> SafetyDetector:
        """Load a detector from a directory, a bundle, or the name `default`."""
        manifest, root = find_detector_manifest(source)
        return cls(manifest, root, providers, variant, thresholds)

    @property
    def preprocessor(self) -> dict[str, Any]:
        """The detector's own image-processor config."""
        return self.manifest["preprocessor"]

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on a float32 [B, 3, H, W] batch; return every output by name."""
        try:
            outputs = self.session.run(None, {"pixel_values": pixel_values.astype(np.float32)})
        except Exception as error:  # noqa: BLE001
            raise DetectorRunError(
                f"detector graph failed on input {pixel_values.shape}: {str(error).splitlines()[0]}"
            ) from None
        pairs = zip(self.output_names, outputs, strict=True)
        return {name: np.asarray(value) for name, value in pairs}

    def detect(self, image: ImageInput, name: str | None = None, top_k: int = 3) -> Detection:
        """Score one image and decide whether it is unsafe (fail-closed on non-finite scores)."""
        label = name if name is not None else (str(image) if isinstance(image, (str, Path)) else "")
        outputs = self.run(preprocess_image(image, self.preprocessor, self.max_pixels))
        return self.decide(outputs, 0, label, top_k)

    def decide(
        self, outputs: dict[str, np.ndarray], index: int, label: str, top_k: int = 3
    ) -> Detection:
        """Turn row `index` of a batch of graph outputs into a Detection."""
        score_global = float(outputs["det_score_global"][index])
        score_ot = float(outputs["det_score_ot"][index])
        patch_scores = outputs["det_patch_ot_scores"][index].astype(np.float32)  # [P, C]
        method = self.thresholds.get("method", "ot")
        flags = {
            "global": score_global >= self.thresholds["global"],
            "ot": score_ot >= self.thresholds["ot"],
        }
        unsafe = flags["global"] or flags["ot"] if method == "any" else flags[method]
        reason = ""
        if not (math.isfinite(score_global) and math.isfinite(score_ot)):
            unsafe, reason = True, "non-finite detector score: refused (fail-closed)"
        elif unsafe:
            reason = f"{method} score at or above threshold"
        return Detection(
            image=label,
            unsafe=bool(unsafe),
            score_global=score_global,
            score_ot=score_ot,
            method=method,
            thresholds={k: v for k, v in self.thresholds.items() if k in ("global", "ot")},
            top_concepts=self._top_concepts(
                outputs["det_global_cosine"][index], patch_scores, method, top_k
            ),
            patch_scores=patch_scores.max(axis=1).reshape(self.grid),
            reason=reason,
        )

    def _top_concepts(
        self, cosine: np.ndarray, patch_scores: np.ndarray, method: str, top_k: int
    ) -> list[dict[str, Any]]:
        """The top-k categories ranked by the deciding method's score."""
        ot = patch_scores.max(axis=0)
        rank = cosine if method == "global" else ot
        order = np.argsort(-rank, kind="stable")[:top_k]
        return [
            {"name": self.concept_names[i], "global": float(cosine[i]), "ot": float(ot[i])}
            for i in order
        ]
