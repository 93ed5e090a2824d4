"""Draw per-patch detector scores over the image the model saw, with Pillow only (online half)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["colorize", "render_heatmap"]

# A dark-blue -> red -> yellow ramp (close to matplotlib's "inferno"), anchors at 0, 1/3, 2/3, 1.
_RAMP = np.array([[0, 0, 40], [120, 20, 110], [230, 70, 30], [255, 230, 60]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 colours along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(position.astype(int), len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return (_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).astype(np.uint8)


def render_heatmap(
    view: np.ndarray,
    patch_scores: np.ndarray,
    threshold: float,
    out_path: str | Path,
    min_side: int = 448,
    alpha: float = 0.55,
) -> Path:
    """Overlay a [grid_h, grid_w] score map on the model's view; outline patches >= threshold."""
    grid_h, grid_w = patch_scores.shape
    low, high = float(patch_scores.min()), float(patch_scores.max())
    normalised = (patch_scores - low) / (high - low) if high > low else np.zeros_like(patch_scores)
    scale = max(1, -(-min_side // min(view.shape[:2])))
    base = Image.fromarray(view).resize(
        (view.shape[1] * scale, view.shape[0] * scale), Image.Resampling.BICUBIC
    )
    colours = Image.fromarray(colorize(normalised)).resize(base.size, Image.Resampling.NEAREST)
    image = Image.blend(base.convert("RGB"), colours, alpha)
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = image.width / grid_w, image.height / grid_h
    for row, col in zip(*np.nonzero(patch_scores >= threshold), strict=True):
        box = [col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1]
        draw.rectangle(box, outline=(255, 0, 0), width=max(2, scale))
    draw.text(
        (4, 4),
        f"OT patch score {low:.3f}..{high:.3f}, threshold {threshold:.3f}",
        fill=(255, 255, 255),
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    return out_path
