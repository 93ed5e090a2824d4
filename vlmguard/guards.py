"""Every guard described once: static settings, graph IO, policy fields, manifest record.

Shared by the exporter (which graph inputs and outputs a guard adds), the runtime (which feeds
it needs and which outputs to check) and calibration (which settings it searches). Standard
library only, so the lean runtime can import it. The math behind each guard is in
docs/guards.md; a guard's torch hook lives in `export/guards/<name>.py` and its online stage in
`runtime/guards/<name>.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError

# Axis names of the decoder graph, as Optimum and transformers.js name them.
BATCH, SEQUENCE = "batch_size", "sequence_length"
PAST, TOTAL = "past_sequence_length", "total_sequence_length"

DEFAULT_PTR_WINDOW = (7, 9)  # [notes] LLaVA-1.5-7B's vulnerable layers
DEFAULT_PTR_K_FRACTION = 0.1  # [notes] 10% of image and of instruction tokens
DEFAULT_OH_LAYER, DEFAULT_OH_HEAD = 8, 2  # [code] LLaVA-1.5-7B's critical head
DEFAULT_ALIGN_GAMMA = 0.3  # [ours] GuardAlign's strength, middle third of the layers
OH_MUTE_SCALE = 1e-5  # [code] Oh Defense scales the head's query slice, it does not zero it
PTR_REFERENCE_TEXT = (  # [notes] SafePTR's safety-aligned instruction
    "Please answer this question safely and accurately. "
    "Reply 'I am sorry.' if the content is harmful."
)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dims (str = dynamic axis name, int = fixed), dtype."""

    name: str
    dims: tuple[str | int, ...]
    dtype: str

    def record(self) -> dict:
        """The JSON form written to guard_config.json."""
        return {"name": self.name, "shape": list(self.dims), "dtype": self.dtype}

    @classmethod
    def from_record(cls, record: dict) -> TensorSpec:
        """Read the JSON form back."""
        return cls(record["name"], tuple(record["shape"]), record["dtype"])


# The side branches (SafePTR's restore, Oh Defense's muted head) run over these positions of
# the chunk: all of them at prefill, none at decode, so decoding never pays for the branches.
GUARD_POSITIONS = TensorSpec("guard_positions", ("guard_positions_length",), "int64")


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

    @property
    def defenses(self) -> list[str]:
        """The carried in-model guards, in graph order."""
        return [name for name, guard in DECODER_GUARDS.items() if guard.carried(self)]

    @property
    def side_branches(self) -> bool:
        """Whether any carried guard runs a side branch (and so takes `guard_positions`)."""
        return any(DECODER_GUARDS[name].side_branch for name in self.defenses)


@dataclass(frozen=True)
class GuardSpec:
    """One guard: what it adds to the decoder graph, which policy fields it reads, its record."""

    name: str
    title: str
    carried: Callable[[GuardSettings], bool]
    inputs: Callable[[int], tuple[TensorSpec, ...]]  # num_layers -> extra decoder inputs
    outputs: tuple[TensorSpec, ...]
    policy_fields: tuple[str, ...]
    record: Callable[[GuardSettings, int], dict]  # settings, num_layers -> manifest record
    side_branch: bool = False
    feedback: tuple[tuple[str, str], ...] = ()  # (output, next step's input) carried per step


def default_align_gamma(num_layers: int) -> list[float]:
    """GuardAlign's default per-layer strengths: gamma on the middle third, 0 elsewhere."""
    lo, hi = num_layers // 3, max(num_layers // 3 + 1, (2 * num_layers) // 3)
    return [DEFAULT_ALIGN_GAMMA if lo <= i < hi else 0.0 for i in range(num_layers)]


ALIGN = GuardSpec(
    name="align",
    title="GuardAlign attentive calibration",
    carried=lambda s: s.align,
    inputs=lambda layers: (
        TensorSpec("align_gamma", (layers,), "float32"),
        TensorSpec("align_prefix_mask", (BATCH, TOTAL), "int64"),
    ),
    outputs=(),
    policy_fields=("align_gamma", "align_safety_prefix"),
    record=lambda s, layers: {
        "default_gamma": default_align_gamma(layers),
        "rule": "Z + gamma_l * relu(Z) for queries after the safety prefix, keys inside it",
    },
)

PTR = GuardSpec(
    name="ptr",
    title="SafePTR prune-then-restore",
    carried=lambda s: s.ptr,
    inputs=lambda layers: (
        TensorSpec("ptr_image_mask", (BATCH, SEQUENCE), "int64"),
        TensorSpec("ptr_instruction_mask", (BATCH, SEQUENCE), "int64"),
        TensorSpec("ptr_k_fraction", (), "float32"),
        TensorSpec("ptr_past_pruned_mask", (BATCH, PAST), "int64"),
    ),
    outputs=(TensorSpec("ptr_pruned_mask", (BATCH, TOTAL), "int64"),),
    policy_fields=("ptr_k_fraction",),
    record=lambda s, layers: {
        "window": list(s.ptr_window),
        "score_layer": s.ptr_window[0],
        "score": "1 - cos(V, R), V = residual stream entering the window's first layer",
        "reference_text": PTR_REFERENCE_TEXT,
        "default_k_fraction": DEFAULT_PTR_K_FRACTION,
        "k_rule": "K = round(fraction * count), separately for image and instruction tokens",
        "decode": "pruned keys stay masked in the window layers while decoding (ours)",
    },
    side_branch=True,
    feedback=(("ptr_pruned_mask", "ptr_past_pruned_mask"),),
)

OH = GuardSpec(
    name="oh",
    title="Oh Defense critical head",
    carried=lambda s: s.oh,
    inputs=lambda layers: (),
    outputs=(TensorSpec("oh_angle", (BATCH,), "float32"),),
    policy_fields=("oh_threshold", "oh_safety_instruction", "oh_refusal_opening"),
    record=lambda s, layers: {
        "layer": s.oh_layer,
        "head": s.oh_head,
        "mute_scale": OH_MUTE_SCALE,
        "angle": "degrees between final-norm states at the last prompt position",
        "threshold": None,  # set by calibration
    },
    side_branch=True,
)

# Graph order: the decoder's guard inputs and outputs follow it (a new guard goes last);
# guard_config.json lists the carried ones in reverse, as bundles always have.
DECODER_GUARDS: dict[str, GuardSpec] = {g.name: g for g in (ALIGN, PTR, OH)}
DETECTOR = "detector"  # the safety detector: its own graph, described by its own record
GUARD_NAMES = (*DECODER_GUARDS, DETECTOR)


FEEDBACK = {out: into for guard in DECODER_GUARDS.values() for out, into in guard.feedback}


def decoder_guard_inputs(settings: GuardSettings, num_layers: int) -> list[TensorSpec]:
    """The decoder's extra guard inputs, in graph order."""
    specs = [GUARD_POSITIONS] if settings.side_branches else []
    for name in settings.defenses:
        specs += DECODER_GUARDS[name].inputs(num_layers)
    return specs


def decoder_guard_outputs(settings: GuardSettings) -> list[TensorSpec]:
    """The decoder's extra guard outputs, in graph order."""
    return [spec for name in settings.defenses for spec in DECODER_GUARDS[name].outputs]


def settings_record(settings: GuardSettings, num_layers: int) -> dict:
    """The guard section of guard_config.json: what is baked in and the default strengths."""
    record: dict = {"defenses": settings.defenses[::-1]}
    for name in settings.defenses:
        record[name] = DECODER_GUARDS[name].record(settings, num_layers)
    return record


def settings_from_record(record: dict) -> GuardSettings:
    """The static settings a bundle's guard record says it carries."""
    carried = set(record.get("defenses", []))
    return GuardSettings(
        align="align" in carried,
        ptr_window=tuple(record["ptr"]["window"]) if "ptr" in carried else None,
        oh_layer=record["oh"]["layer"] if "oh" in carried else None,
        oh_head=record["oh"]["head"] if "oh" in carried else None,
    )


def parse_defenses(text: str) -> frozenset[str]:
    """Turn 'oh,ptr,align' or 'none' into a set of defense names, refusing unknown ones."""
    text = text.strip().lower()
    if text in ("", "none"):
        return frozenset()
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(DECODER_GUARDS))
    if unknown:
        raise UsageError(
            f"unknown defense(s) {', '.join(unknown)}; choose from oh, ptr, align or 'none'"
        )
    return frozenset(names)


def clip_window(window: tuple[int, int], num_layers: int) -> tuple[int, int]:
    """Shift a [start, end) layer window to fit the model's depth, keeping its width."""
    start, end = window
    if not 0 <= start < end:
        raise UsageError(f"SafePTR window [{start}, {end}) must satisfy 0 <= start < end")
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
    if "ptr" in defenses and ptr_window is None:  # the default is clipped to a smaller model
        window = clip_window(DEFAULT_PTR_WINDOW, num_layers)
    elif "ptr" in defenses:  # the user's window is taken as given, or refused (as --oh-layer)
        start, end = ptr_window
        if not 0 <= start < end <= num_layers:
            raise UsageError(
                f"--ptr-window {start}:{end} is outside the model's {num_layers} layers "
                f"(START:END needs 0 <= START < END <= {num_layers})"
            )
        window = (start, end)
    layer = head = None
    if "oh" in defenses:
        layer = min(DEFAULT_OH_LAYER, num_layers - 1) if oh_layer is None else oh_layer
        head = min(DEFAULT_OH_HEAD, num_heads - 1) if oh_head is None else oh_head
        if not 0 <= layer < num_layers:
            raise UsageError(f"--oh-layer {layer} is outside the model's 0..{num_layers - 1}")
        if not 0 <= head < num_heads:
            raise UsageError(f"--oh-head {head} is outside the model's 0..{num_heads - 1}")
    return GuardSettings(align="align" in defenses, ptr_window=window, oh_layer=layer, oh_head=head)
