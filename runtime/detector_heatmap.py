"""Draw per-patch detector scores over the image the model saw, with Pillow only (online half).

The colour scale is fixed around the detector's threshold, the same for every image: 0 (and
below) is the bottom of the ramp, the threshold its middle, twice the threshold (and above) its
top. A safe image therefore stays cool everywhere, instead of its highest patch (however low)
getting the hottest colour. Below the picture a colour bar marks 0, the threshold and the top;
above it, a title in white on a dark band.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colorize", "render_heatmap", "scale_scores"]

# A dark-blue -> red -> yellow ramp (close to matplotlib's "inferno"), anchors at 0, 1/3, 2/3, 1.
_RAMP = np.array([[0, 0, 40], [120, 20, 110], [230, 70, 30], [255, 230, 60]], dtype=np.float32)
_BAND = (24, 24, 28)  # the title and colour-bar bands: dark grey, text in white on it
_TEXT = (255, 255, 255)
_OUTLINE = (0, 255, 255)  # patches at or over the threshold: cyan, apart from the ramp's hues


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 colours along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(position.astype(int), len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return (_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).astype(np.uint8)


def scale_scores(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Scores on the fixed scale: 0 -> 0, the threshold -> 0.5, twice the threshold -> 1."""
    top = 2.0 * threshold if threshold > 0 else 1.0
    return np.clip(np.asarray(scores, dtype=np.float32) / top, 0.0, 1.0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at this size (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def render_heatmap(
    view: np.ndarray,
    patch_scores: np.ndarray,
    threshold: float,
    out_path: str | Path,
    min_side: int = 448,
    alpha: float = 0.75,
) -> Path:
    """Overlay a [grid_h, grid_w] score map on the model's view; outline patches >= threshold.

    The overlay's opacity grows with the score up to the threshold (a cool patch barely tints
    the picture, one at the threshold is `alpha` opaque); the PNG is the picture plus a title
    band above and a colour bar below.
    """
    grid_h, grid_w = patch_scores.shape
    scaled = scale_scores(patch_scores, threshold)
    scale = max(1, -(-min_side // min(view.shape[:2])))
    base = Image.fromarray(view).convert("RGB")
    base = base.resize((view.shape[1] * scale, view.shape[0] * scale), Image.Resampling.BICUBIC)
    colours = Image.fromarray(colorize(scaled)).resize(base.size, Image.Resampling.NEAREST)
    opacity = Image.fromarray((255 * alpha * np.clip(2 * scaled, 0.15, 1.0)).astype(np.uint8))
    picture = Image.composite(colours, base, opacity.resize(base.size, Image.Resampling.NEAREST))
    draw = ImageDraw.Draw(picture)
    cell_w, cell_h = picture.width / grid_w, picture.height / grid_h
    for row, col in zip(*np.nonzero(patch_scores >= threshold), strict=True):
        box = [col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1]
        draw.rectangle(box, outline=_OUTLINE, width=max(2, scale))

    font_size = max(12, picture.width // 32)
    font = _font(font_size)
    title_h, bar_h = font_size + 12, 2 * font_size + 22
    canvas = Image.new("RGB", (picture.width, title_h + picture.height + bar_h), _BAND)
    canvas.paste(picture, (0, title_h))
    draw = ImageDraw.Draw(canvas)
    flagged = int((patch_scores >= threshold).sum())
    title = (
        f"OT patch scores {float(patch_scores.min()):.3f}..{float(patch_scores.max()):.3f}; "
        f"threshold {threshold:.3f}: {flagged} patch{'es' if flagged != 1 else ''} at or over"
    )
    draw.text((6, 6), title, fill=_TEXT, font=font)

    # The colour bar: the ramp from 0 to twice the threshold, ticks at 0, threshold, top.
    margin = 10
    top = title_h + picture.height + 6
    width = canvas.width - 2 * margin
    ramp = colorize(np.linspace(0.0, 1.0, width, dtype=np.float32))[None, :, :]
    strip = Image.fromarray(np.repeat(ramp, font_size, axis=0))
    canvas.paste(strip, (margin, top))
    ticks = ((0.0, "0"), (0.5, f"{threshold:.3f} threshold"), (1.0, f"{2 * threshold:.3f}+"))
    for position, label in ticks:
        x = margin + round(position * (width - 1))
        draw.line([(x, top - 3), (x, top + font_size + 2)], fill=_TEXT, width=2)
        text_w = draw.textlength(label, font=font)
        anchor_x = min(max(margin, x - text_w / 2), canvas.width - margin - text_w)
        draw.text((anchor_x, top + font_size + 5), label, fill=_TEXT, font=font)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path
