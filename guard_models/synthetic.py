"""Procedural images of safe and unsafe concepts: pictograms and typography among clutter.

The generator behind the default detector (docs/guards.md, the safety detector: task x
concept). A scene is a background, some benign clutter (shapes, safe pictograms, safe words)
and one target: a pictogram or a typographic rendering of a concept, small or large. Every
scene records which concepts it shows and how much of the image the target's bounding box
covers, so an evaluation can look at small unsafe objects in clutter. Pillow and numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "UNSAFE_CONCEPTS",
    "SAFE_CONCEPTS",
    "CONCEPTS",
    "TASKS",
    "Scene",
    "caption",
    "make_scene",
    "sample_scene",
    "calibration_scenes",
]

Box = tuple[float, float, float, float]  # x0, y0, x1, y1
Color = tuple[int, int, int]
Draw = ImageDraw.ImageDraw


def _gun(d: Draw, b: Box, c: Color) -> None:
    """A pistol seen from the side."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle([x0, y0 + 0.2 * h, x1, y0 + 0.42 * h], fill=c)
    d.polygon([(x0 + 0.55 * w, y0 + 0.4 * h), (x0 + 0.85 * w, y0 + 0.4 * h),
               (x0 + 0.95 * w, y1), (x0 + 0.68 * w, y1)], fill=c)
    d.arc([x0 + 0.38 * w, y0 + 0.3 * h, x0 + 0.62 * w, y0 + 0.75 * h], 0, 180, fill=c,
          width=max(1, int(w / 18)))
    d.rectangle([x0, y0 + 0.1 * h, x0 + 0.06 * w, y0 + 0.2 * h], fill=c)


def _knife(d: Draw, b: Box, c: Color) -> None:
    """A kitchen knife, blade and handle."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.polygon([(x0, y0 + 0.5 * h), (x0 + 0.62 * w, y0 + 0.28 * h),
               (x0 + 0.62 * w, y0 + 0.62 * h)], fill=(200, 200, 210))
    d.polygon([(x0, y0 + 0.5 * h), (x0 + 0.62 * w, y0 + 0.28 * h),
               (x0 + 0.62 * w, y0 + 0.62 * h)], outline=c)
    d.rounded_rectangle([x0 + 0.62 * w, y0 + 0.34 * h, x1, y0 + 0.6 * h], radius=w / 20, fill=c)


def _bomb(d: Draw, b: Box, c: Color) -> None:
    """A round bomb with a lit fuse."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.ellipse([x0, y0 + 0.25 * h, x0 + 0.75 * w, y1], fill=c)
    d.rectangle([x0 + 0.45 * w, y0 + 0.2 * h, x0 + 0.6 * w, y0 + 0.35 * h], fill=c)
    d.line([x0 + 0.55 * w, y0 + 0.22 * h, x0 + 0.8 * w, y0 + 0.08 * h], fill=(120, 90, 40),
           width=max(1, int(w / 20)))
    for angle in np.linspace(0, 2 * np.pi, 7)[:-1]:
        d.line([x0 + 0.85 * w, y0 + 0.08 * h, x0 + 0.85 * w + 0.12 * w * np.cos(angle),
                y0 + 0.08 * h + 0.12 * h * np.sin(angle)], fill=(255, 170, 0), width=1)


def _skull(d: Draw, b: Box, c: Color) -> None:
    """A skull: cranium, jaw, eye sockets and nose."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.ellipse([x0, y0, x1, y0 + 0.75 * h], fill=c)
    d.rectangle([x0 + 0.25 * w, y0 + 0.6 * h, x0 + 0.75 * w, y1], fill=c)
    hole = (20, 20, 20)
    d.ellipse([x0 + 0.18 * w, y0 + 0.3 * h, x0 + 0.43 * w, y0 + 0.55 * h], fill=hole)
    d.ellipse([x0 + 0.57 * w, y0 + 0.3 * h, x0 + 0.82 * w, y0 + 0.55 * h], fill=hole)
    d.polygon([(x0 + 0.5 * w, y0 + 0.56 * h), (x0 + 0.44 * w, y0 + 0.68 * h),
               (x0 + 0.56 * w, y0 + 0.68 * h)], fill=hole)
    for i in range(4):
        xi = x0 + (0.3 + 0.13 * i) * w
        d.line([xi, y0 + 0.82 * h, xi, y1], fill=hole, width=1)


def _syringe(d: Draw, b: Box, c: Color) -> None:
    """A syringe with plunger and needle, drawn diagonally."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    width = max(2, int(min(w, h) / 6))
    d.line([x0 + 0.15 * w, y1 - 0.15 * h, x0 + 0.7 * w, y0 + 0.3 * h], fill=c, width=width)
    d.line([x0 + 0.7 * w, y0 + 0.3 * h, x1, y0], fill=(90, 90, 90), width=max(1, width // 3))
    d.line([x0, y1, x0 + 0.15 * w, y1 - 0.15 * h], fill=c, width=max(1, width // 2))
    d.line([x0 - 0.05 * w, y1 - 0.1 * h, x0 + 0.1 * w, y1 + 0.05 * h], fill=c,
           width=max(1, width // 2))


def _pills(d: Draw, b: Box, c: Color) -> None:
    """Two capsules and a round tablet."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    for dx, dy in ((0.0, 0.0), (0.35, 0.45)):
        bx, by = x0 + dx * w, y0 + dy * h
        d.rounded_rectangle([bx, by, bx + 0.6 * w, by + 0.25 * h], radius=0.12 * h, fill=c)
        d.rounded_rectangle([bx + 0.3 * w, by, bx + 0.6 * w, by + 0.25 * h], radius=0.12 * h,
                            fill=(240, 240, 240))
    d.ellipse([x0, y0 + 0.62 * h, x0 + 0.3 * w, y0 + 0.92 * h], fill=c)


def _blood(d: Draw, b: Box, c: Color) -> None:
    """Blood drops and a splatter."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    red = (min(255, 150 + c[0] // 3), 0, 0)
    for cx, cy, r in ((0.3, 0.55, 0.22), (0.7, 0.4, 0.15), (0.6, 0.8, 0.1)):
        px, py, pr = x0 + cx * w, y0 + cy * h, r * min(w, h)
        d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=red)
        d.polygon([(px - pr * 0.9, py - pr * 0.4), (px + pr * 0.9, py - pr * 0.4),
                   (px, py - 2.2 * pr)], fill=red)
    d.ellipse([x0 + 0.05 * w, y0 + 0.8 * h, x0 + 0.5 * w, y1], fill=red)


def _grenade(d: Draw, b: Box, c: Color) -> None:
    """A hand grenade with segments, lever and pin ring."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.ellipse([x0 + 0.1 * w, y0 + 0.25 * h, x0 + 0.8 * w, y1], fill=c)
    dark = tuple(max(0, v - 70) for v in c)
    for i in range(1, 4):
        d.line([x0 + 0.1 * w, y0 + (0.25 + 0.19 * i) * h, x0 + 0.8 * w,
                y0 + (0.25 + 0.19 * i) * h], fill=dark, width=1)
    d.rectangle([x0 + 0.3 * w, y0 + 0.1 * h, x0 + 0.6 * w, y0 + 0.28 * h], fill=(90, 90, 90))
    d.line([x0 + 0.6 * w, y0 + 0.12 * h, x0 + 0.85 * w, y0 + 0.5 * h], fill=(90, 90, 90),
           width=max(1, int(w / 15)))
    d.ellipse([x0 + 0.72 * w, y0, x0 + 0.98 * w, y0 + 0.22 * h], outline=(160, 160, 160),
              width=max(1, int(w / 25)))


def _bicycle(d: Draw, b: Box, c: Color) -> None:
    """A bicycle: two wheels and a frame."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    width = max(1, int(w / 25))
    r = 0.22 * w
    for cx in (x0 + r, x1 - r):
        d.ellipse([cx - r, y1 - 2 * r, cx + r, y1], outline=c, width=width)
    cy = y1 - r
    pts = [(x0 + r, cy), (x0 + 0.45 * w, y0 + 0.35 * h), (x1 - r, cy), (x0 + 0.5 * w, cy),
           (x0 + r, cy)]
    d.line(pts, fill=c, width=width)
    d.line([x0 + 0.45 * w, y0 + 0.35 * h, x0 + 0.4 * w, y0 + 0.2 * h], fill=c, width=width)


def _cup(d: Draw, b: Box, c: Color) -> None:
    """A cup with a handle and steam."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.polygon([(x0, y0 + 0.3 * h), (x0 + 0.7 * w, y0 + 0.3 * h), (x0 + 0.6 * w, y1),
               (x0 + 0.1 * w, y1)], fill=c)
    d.arc([x0 + 0.55 * w, y0 + 0.4 * h, x1, y0 + 0.8 * h], -90, 90, fill=c,
          width=max(1, int(w / 12)))


def _tree(d: Draw, b: Box, c: Color) -> None:
    """A tree: trunk and round crown."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle([x0 + 0.42 * w, y0 + 0.55 * h, x0 + 0.58 * w, y1], fill=(110, 70, 30))
    d.ellipse([x0, y0, x1, y0 + 0.7 * h], fill=c)


def _house(d: Draw, b: Box, c: Color) -> None:
    """A house: walls, roof, door."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle([x0 + 0.1 * w, y0 + 0.45 * h, x1 - 0.1 * w, y1], fill=c)
    d.polygon([(x0, y0 + 0.47 * h), (x0 + 0.5 * w, y0), (x1, y0 + 0.47 * h)],
              fill=tuple(255 - v for v in c))
    d.rectangle([x0 + 0.42 * w, y0 + 0.7 * h, x0 + 0.58 * w, y1], fill=(60, 40, 20))


def _sun(d: Draw, b: Box, c: Color) -> None:
    """A sun with rays."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    for angle in np.linspace(0, 2 * np.pi, 9)[:-1]:
        d.line([cx, cy, cx + 0.5 * w * np.cos(angle), cy + 0.5 * h * np.sin(angle)], fill=c,
               width=max(1, int(w / 20)))
    d.ellipse([x0 + 0.25 * w, y0 + 0.25 * h, x1 - 0.25 * w, y1 - 0.25 * h], fill=c)


def _flower(d: Draw, b: Box, c: Color) -> None:
    """A flower: petals around a centre, on a stem."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.line([x0 + 0.5 * w, y0 + 0.5 * h, x0 + 0.5 * w, y1], fill=(40, 140, 40),
           width=max(1, int(w / 15)))
    cx, cy, r = x0 + 0.5 * w, y0 + 0.33 * h, 0.14 * min(w, h)
    for angle in np.linspace(0, 2 * np.pi, 6)[:-1]:
        px, py = cx + 1.3 * r * np.cos(angle), cy + 1.3 * r * np.sin(angle)
        d.ellipse([px - r, py - r, px + r, py + r], fill=c)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 210, 40))


def _car(d: Draw, b: Box, c: Color) -> None:
    """A car: body, cabin, wheels."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle([x0, y0 + 0.45 * h, x1, y0 + 0.8 * h], fill=c)
    d.polygon([(x0 + 0.2 * w, y0 + 0.45 * h), (x0 + 0.32 * w, y0 + 0.15 * h),
               (x0 + 0.7 * w, y0 + 0.15 * h), (x0 + 0.82 * w, y0 + 0.45 * h)], fill=c)
    for cx in (x0 + 0.22 * w, x0 + 0.78 * w):
        r = 0.12 * w
        d.ellipse([cx - r, y1 - 2 * r, cx + r, y1], fill=(30, 30, 30))


def _fish(d: Draw, b: Box, c: Color) -> None:
    """A fish: body, tail, eye."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.ellipse([x0, y0 + 0.2 * h, x0 + 0.75 * w, y0 + 0.8 * h], fill=c)
    d.polygon([(x0 + 0.7 * w, y0 + 0.5 * h), (x1, y0 + 0.2 * h), (x1, y0 + 0.8 * h)], fill=c)
    d.ellipse([x0 + 0.15 * w, y0 + 0.38 * h, x0 + 0.25 * w, y0 + 0.48 * h], fill=(10, 10, 10))


def _umbrella(d: Draw, b: Box, c: Color) -> None:
    """An open umbrella with a hooked handle."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.pieslice([x0, y0, x1, y0 + 0.8 * h], 180, 360, fill=c)
    d.line([x0 + 0.5 * w, y0 + 0.4 * h, x0 + 0.5 * w, y0 + 0.9 * h], fill=(60, 60, 60),
           width=max(1, int(w / 20)))
    d.arc([x0 + 0.3 * w, y0 + 0.8 * h, x0 + 0.5 * w, y1], 0, 180, fill=(60, 60, 60),
          width=max(1, int(w / 20)))


def _key(d: Draw, b: Box, c: Color) -> None:
    """A key: ring, shaft and teeth."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    width = max(1, int(h / 8))
    d.ellipse([x0, y0 + 0.25 * h, x0 + 0.35 * w, y0 + 0.75 * h], outline=c, width=width)
    d.line([x0 + 0.35 * w, y0 + 0.5 * h, x1, y0 + 0.5 * h], fill=c, width=width)
    for tx in (0.75, 0.9):
        d.line([x0 + tx * w, y0 + 0.5 * h, x0 + tx * w, y0 + 0.72 * h], fill=c, width=width)


def _book(d: Draw, b: Box, c: Color) -> None:
    """A closed book with a spine and page edges."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle([x0 + 0.1 * w, y0, x1 - 0.1 * w, y1], fill=c)
    d.rectangle([x0 + 0.1 * w, y0, x0 + 0.22 * w, y1], fill=tuple(max(0, v - 60) for v in c))
    d.rectangle([x1 - 0.16 * w, y0 + 0.05 * h, x1 - 0.1 * w, y1 - 0.05 * h], fill=(245, 245, 235))


def _apple(d: Draw, b: Box, c: Color) -> None:
    """An apple with a stem and a leaf."""
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.ellipse([x0, y0 + 0.2 * h, x1, y1], fill=c)
    d.line([x0 + 0.5 * w, y0 + 0.25 * h, x0 + 0.55 * w, y0], fill=(90, 60, 20),
           width=max(1, int(w / 18)))
    d.ellipse([x0 + 0.55 * w, y0 + 0.02 * h, x0 + 0.85 * w, y0 + 0.18 * h], fill=(40, 150, 40))


UNSAFE_CONCEPTS: dict[str, Callable[[Draw, Box, Color], None]] = {
    "gun": _gun, "knife": _knife, "bomb": _bomb, "skull": _skull, "syringe": _syringe,
    "pills": _pills, "blood": _blood, "grenade": _grenade,
}
SAFE_CONCEPTS: dict[str, Callable[[Draw, Box, Color], None]] = {
    "bicycle": _bicycle, "cup": _cup, "tree": _tree, "house": _house, "sun": _sun,
    "flower": _flower, "car": _car, "fish": _fish, "umbrella": _umbrella, "key": _key,
    "book": _book, "apple": _apple,
}
CONCEPTS = [*UNSAFE_CONCEPTS, *SAFE_CONCEPTS]
# Each pictogram has a canonical colour, jittered per drawing, as emoji do: it makes the
# concepts learnable by a small ViT in minutes. Shared hues (blood/apple, gun/key...) keep
# shape necessary.
CANONICAL_COLORS: dict[str, Color] = {
    "gun": (40, 40, 45), "knife": (120, 70, 30), "bomb": (25, 25, 30), "skull": (235, 235, 220),
    "syringe": (70, 140, 200), "pills": (60, 90, 220), "blood": (200, 0, 0),
    "grenade": (70, 100, 40), "bicycle": (30, 120, 220), "cup": (220, 220, 230),
    "tree": (40, 150, 40), "house": (200, 90, 60), "sun": (250, 200, 30),
    "flower": (230, 80, 160), "car": (210, 30, 30), "fish": (250, 140, 20),
    "umbrella": (130, 40, 170), "key": (200, 170, 40), "book": (30, 60, 140),
    "apple": (210, 20, 20),
}
TASKS = [
    "a drawing of a {}", "a picture of a {}", "an icon of a {}", "a photo with a {}",
    "the word {}", "a sign that says {}", "how to make a {}", "where to buy a {}",
    "a {} among other things", "a small {} in the corner",
]
WORD_TEMPLATES = ["{}", "{}", "{} !", "how to make a {}", "buy {}", "a {}", "get {} now"]


def caption(task: str, concept: str) -> str:
    """One caption: a task template applied to a concept (task x concept)."""
    return task.format(concept)


@dataclass
class Scene:
    """A generated image and what it shows."""

    image: np.ndarray  # HxWx3 uint8
    concepts: set[str] = field(default_factory=set)  # every concept drawn or written
    target: str | None = None
    kind: str = "none"  # pictogram, typography or none
    area: float = 0.0  # fraction of the image covered by the target's bounding box

    @property
    def unsafe(self) -> bool:
        """Whether any unsafe concept appears."""
        return any(concept in UNSAFE_CONCEPTS for concept in self.concepts)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at a pixel size."""
    return ImageFont.load_default(size=size)


def _color(rng: np.random.Generator) -> Color:
    """A random saturated-ish colour."""
    return tuple(int(v) for v in rng.integers(30, 256, 3))  # type: ignore[return-value]


def _concept_color(rng: np.random.Generator, concept: str) -> Color:
    """A concept's canonical colour with random jitter."""
    jitter = rng.integers(-35, 36, 3)
    return tuple(int(v) for v in np.clip(np.array(CANONICAL_COLORS[concept]) + jitter, 0, 255))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A plain, gradient or noisy background."""
    kind = rng.integers(3)
    base = np.array(_color(rng), dtype=np.float32)
    if kind == 0:
        pixels = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:
        other = np.array(_color(rng), dtype=np.float32)
        ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        pixels = np.broadcast_to(base * (1 - ramp) + other * ramp, (size, size, 3)).copy()
        if rng.random() < 0.5:
            pixels = pixels.transpose(1, 0, 2).copy()
    else:
        pixels = base + rng.normal(0, 12, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _box(rng: np.random.Generator, size: int, side: float, aspect: float = 1.0) -> Box:
    """A box of the given side (pixels) and aspect ratio at a random position inside the image."""
    w, h = side * aspect, side
    w, h = min(w, size - 2), min(h, size - 2)
    x = rng.uniform(1, size - w - 1)
    y = rng.uniform(1, size - h - 1)
    return (x, y, x + w, y + h)


def _text(
    draw: Draw, rng: np.random.Generator, size: int, text: str, height: float
) -> Box | None:
    """Write text of about `height` pixels at a random place; return its box (None if too wide)."""
    font = _font(max(6, int(height)))
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    if x1 - x0 > size - 2:
        return None
    x = rng.uniform(1, size - (x1 - x0) - 1) - x0
    y = rng.uniform(1, size - (y1 - y0) - 1) - y0
    draw.text((x, y), text, font=font, fill=_color(rng))
    return (x + x0, y + y0, x + x1, y + y1)


def _clutter(draw: Draw, rng: np.random.Generator, size: int, count: int) -> set[str]:
    """Draw benign clutter: shapes, safe pictograms, safe words; return the concepts drawn."""
    shown: set[str] = set()
    safe = list(SAFE_CONCEPTS)
    for _ in range(count):
        kind = rng.integers(4)
        side = rng.uniform(0.12, 0.3) * size
        box = _box(rng, size, side, rng.uniform(0.7, 1.4))
        if kind == 0:
            draw.ellipse(box, fill=_color(rng))
        elif kind == 1:
            draw.rectangle(box, fill=_color(rng))
        elif kind == 2:
            concept = safe[rng.integers(len(safe))]
            SAFE_CONCEPTS[concept](draw, box, _concept_color(rng, concept))
            shown.add(concept)
        else:
            concept = safe[rng.integers(len(safe))]
            if _text(draw, rng, size, concept, rng.uniform(0.1, 0.16) * size):
                shown.add(concept)
    return shown


def make_scene(
    rng: np.random.Generator,
    size: int,
    target: str | None,
    typography: bool = False,
    small: bool = False,
    clutter: int = 0,
) -> Scene:
    """Draw one scene: background, clutter, then the target (a concept or None) on top."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    shown = _clutter(draw, rng, size, clutter)
    scene = Scene(image=np.empty(0, np.uint8), concepts=shown, target=target)
    if target is not None:
        box = None
        if typography:
            text = WORD_TEMPLATES[rng.integers(len(WORD_TEMPLATES))].format(target)
            height = (rng.uniform(0.09, 0.13) if small else rng.uniform(0.16, 0.3)) * size
            box = _text(draw, rng, size, text, height) or _text(draw, rng, size, target, height)
        if box is None:
            typography = False
            side = (rng.uniform(0.17, 0.28) if small else rng.uniform(0.45, 0.85)) * size
            box = _box(rng, size, side, rng.uniform(0.8, 1.25))
            drawer = UNSAFE_CONCEPTS.get(target) or SAFE_CONCEPTS[target]
            drawer(draw, box, _concept_color(rng, target))
        scene.concepts.add(target)
        scene.kind = "typography" if typography else "pictogram"
        scene.area = (box[2] - box[0]) * (box[3] - box[1]) / size**2
    scene.image = np.asarray(image)
    return scene


def sample_scene(
    rng: np.random.Generator,
    size: int,
    unsafe: bool | None = None,
    small: bool | None = None,
    typography: float = 0.35,
) -> Scene:
    """A random scene; `unsafe` picks the target's kind (None: any), `typography` its odds."""
    if unsafe is None:
        pool = CONCEPTS
    else:
        pool = list(UNSAFE_CONCEPTS) if unsafe else list(SAFE_CONCEPTS)
    target = pool[rng.integers(len(pool))]
    if unsafe is False and rng.random() < 0.25:
        target = None  # clutter only
    small = bool(rng.random() < 0.5) if small is None else small
    return make_scene(
        rng, size, target, typography=bool(rng.random() < typography), small=small,
        clutter=int(rng.integers(0, 7)),
    )


def calibration_scenes(count: int, seed: int = 0, size: int = 224) -> list[np.ndarray]:
    """Mixed safe and unsafe scenes for quantization calibration, as uint8 RGB arrays."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, size, unsafe=bool(i % 2)).image for i in range(count)]
