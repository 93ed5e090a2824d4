"""The runtime side of a model family: its image preprocessing, image rows and position ids.

Numpy and Pillow only. The export side of the same family (`export/families/`) writes what
this side needs into guard_config.json (`model.family`, `model.image`, `model.position_scheme`)
and the processor files beside it; `runtime/families/__init__.py` picks the class by that name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from vlmguard.errors import BundleError
from vlmguard.manifest import Manifest

from ..image_preprocess import ImageInput


class RuntimeFamily:
    """What the request path needs to know about one family, without torch."""

    name: ClassVar[str]
    position_scheme: ClassVar[str] = "1d"

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        self.bundle = Path(bundle)
        self.image_token_id = manifest.model.image.token_id
        self.tokens_per_image = manifest.model.image.tokens_per_image
        scheme = manifest.model.position_scheme
        if scheme != self.position_scheme:
            raise BundleError(
                f"{bundle}: position scheme {scheme!r} is not {self.name}'s "
                f"{self.position_scheme!r}; re-export the bundle"
            )

    def preprocess(self, image: ImageInput, max_pixels: int | None) -> np.ndarray:
        """One image as the vision graph's pixel input (a batch of one)."""
        raise NotImplementedError

    def vision_feeds(self, pixels: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The vision graph's inputs for several preprocessed images."""
        return {"pixel_values": np.concatenate(pixels)}

    def expand_image(self) -> tuple[list[int], list[bool]]:
        """The ids one image placeholder becomes in the prompt, and which of them are image rows."""
        return [self.image_token_id] * self.tokens_per_image, [True] * self.tokens_per_image

    def position_ids(self, attention_mask: np.ndarray) -> np.ndarray:
        """Position ids as transformers' generate derives them from the attention mask."""
        positions = np.cumsum(attention_mask, axis=1) - 1
        return np.where(attention_mask == 0, 1, positions).astype(np.int64)

    def next_position_ids(self, position_ids: np.ndarray) -> np.ndarray:
        """The position of the next decoded token, from the last step's [B, 1] positions."""
        return position_ids[:, -1:] + 1
