"""LLaVA at run time: one fixed-size CLIP/SigLIP image, its rows repeated in the prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmguard.errors import BundleError
from vlmguard.manifest import Manifest

from ..image_preprocess import ImageInput, preprocess_image
from .base import RuntimeFamily


class LlavaRuntime(RuntimeFamily):
    """Resize, crop and normalise as the CLIP/SigLIP image processor does; 1-D positions."""

    name = "llava"

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        super().__init__(bundle, manifest)
        path = self.bundle / "preprocessor_config.json"
        if not path.is_file():
            raise BundleError(f"{self.bundle} lacks {path.name}; re-export the bundle")
        self.processor_config = json.loads(path.read_text())

    def preprocess(self, image: ImageInput, max_pixels: int | None) -> np.ndarray:
        """Pixel values [1, 3, S, S], as the transformers image processor gives them."""
        return preprocess_image(image, self.processor_config, max_pixels)
