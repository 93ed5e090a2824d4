"""Which in-model guards a bundle carries, their export-time defaults, and how they are recorded.

Defaults and their evidence (METHODS.md): the SafePTR window [7, 9) and K = 10% come from
paper notes; Oh Defense's layer 8, head 2 is LLaVA-1.5-7B's published head; both are
clipped to the model's depth until calibration picks them for the model at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFENSES = ("oh", "ptr", "align")
DEFAULT_PTR_WINDOW = (7, 9)  # [notes] LLaVA-1.5-7B's vulnerable layers
DEFAULT_PTR_K_FRACTION = 0.1  # [notes] 10% of image and of instruction tokens
DEFAULT_OH_LAYER, DEFAULT_OH_HEAD = 8, 2  # [code] LLaVA-1.5-7B's critical head
DEFAULT_ALIGN_GAMMA = 0.3  # [ours] GuardAlign's strength, middle third of the layers
PTR_REFERENCE_TEXT = (  # [notes] SafePTR's safety-aligned instruction
    "Please answer this question safely and accurately. "
    "Reply 'I am sorry.' if the content is harmful."
)


@dataclass(frozen=True)
class GuardSettings:
    """Which in-model guards a decoder carries and their static (export-time) parts."""

    align: bool = False
    ptr_window: tuple[int, int] | None = None  # [start, end) layers
    oh_layer: int | None = None
    oh_head: int | None = None

    @property
    def ptr(self) -> bool:
        """Whether SafePTR is carried."""
        return self.ptr_window is not None

    @property
    def oh(self) -> bool:
        """Whether Oh Defense is carried."""
        return self.oh_layer is not None


def parse_defenses(text: str) -> frozenset[str]:
    """Turn 'oh,ptr,align' or 'none' into a set of defense names, refusing unknown ones."""
    text = text.strip().lower()
    if text in ("", "none"):
        return frozenset()
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(DEFENSES))
    if unknown:
        raise ValueError(
            f"unknown defense(s) {', '.join(unknown)}; choose from {', '.join(DEFENSES)} or 'none'"
        )
    return frozenset(names)


def clip_window(window: tuple[int, int], num_layers: int) -> tuple[int, int]:
    """Shift a [start, end) layer window to fit the model's depth, keeping its width."""
    start, end = window
    if not 0 <= start < end:
        raise ValueError(f"SafePTR window [{start}, {end}) must satisfy 0 <= start < end")
    width = min(end - start, num_layers)
    start = max(0, min(start, num_layers - width))
    return start, start + width


def resolve_settings(
    defenses: frozenset[str],
    num_layers: int,
    num_heads: int,
    ptr_window: tuple[int, int] | None = None,
    oh_layer: int | None = None,
    oh_head: int | None = None,
) -> GuardSettings:
    """Fill in the export-time parts of the chosen guards for a model of this shape."""
    window = None
    if "ptr" in defenses:
        window = clip_window(ptr_window or DEFAULT_PTR_WINDOW, num_layers)
    layer = head = None
    if "oh" in defenses:
        layer = min(DEFAULT_OH_LAYER, num_layers - 1) if oh_layer is None else oh_layer
        head = min(DEFAULT_OH_HEAD, num_heads - 1) if oh_head is None else oh_head
        if not 0 <= layer < num_layers:
            raise ValueError(f"--oh-layer {layer} is outside the model's 0..{num_layers - 1}")
        if not 0 <= head < num_heads:
            raise ValueError(f"--oh-head {head} is outside the model's 0..{num_heads - 1}")
    return GuardSettings(align="align" in defenses, ptr_window=window, oh_layer=layer, oh_head=head)


def default_align_gamma(num_layers: int) -> list[float]:
    """GuardAlign's default per-layer strengths: gamma on the middle third, 0 elsewhere."""
    lo, hi = num_layers // 3, max(num_layers // 3 + 1, (2 * num_layers) // 3)
    return [DEFAULT_ALIGN_GAMMA if lo <= i < hi else 0.0 for i in range(num_layers)]


def settings_record(settings: GuardSettings, num_layers: int) -> dict:
    """The guard section of guard_config.json: what is baked in and the default strengths."""
    record: dict = {"defenses": [d for d in DEFENSES if _carries(settings, d)]}
    if settings.align:
        record["align"] = {
            "default_gamma": default_align_gamma(num_layers),
            "rule": "Z + gamma_l * relu(Z) for queries after the safety prefix, keys inside it",
        }
    if settings.ptr:
        record["ptr"] = {
            "window": list(settings.ptr_window),
            "score_layer": settings.ptr_window[0],
            "score": "1 - cos(V, R), V = residual stream entering the window's first layer",
            "reference_text": PTR_REFERENCE_TEXT,
            "default_k_fraction": DEFAULT_PTR_K_FRACTION,
            "k_rule": "K = round(fraction * count), separately for image and instruction tokens",
            "decode": "pruned keys stay masked in the window layers while decoding (ours)",
        }
    if settings.oh:
        record["oh"] = {
            "layer": settings.oh_layer,
            "head": settings.oh_head,
            "mute_scale": 1e-5,
            "angle": "degrees between final-norm states at the last prompt position",
            "threshold": None,  # set by calibration
        }
    return record


def _carries(settings: GuardSettings, defense: str) -> bool:
    """Whether the settings carry the named defense."""
    return {"oh": settings.oh, "ptr": settings.ptr, "align": settings.align}[defense]
