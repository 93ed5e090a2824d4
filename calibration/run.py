"""`calibrate`: the whole calibration of one source model on one labelled JSONL file."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlmguard import __version__
from vlmguard.export.families import family_for
from vlmguard.export.source import load_source, resolve_source
from vlmguard.guards import DEFAULT_PTR_K_FRACTION, GuardSettings
from vlmguard.runtime.policy import ALIGN_SAFETY_PREFIX, GuardPolicy

from .align_strength import ALIGN_GAMMAS, layer_ranges, search_strength
from .data import data_hash, read_samples, split_holdout
from .detector_scores import detector_scores, detector_thresholds
from .errors import CalibrationOptionError
from .oh_sweep import SAFE_PERCENTILE, HeadChoice, guarded_angles, select_head, sweep_angles
from .prompts import PromptEncoder, batches
from .ptr_window import (
    PTR_WIDTHS,
    candidate_windows,
    make_decoder,
    ptr_guards,
    reference_states,
    search_windows,
)
from .refusal import REFUSAL_OPENINGS, refusal_token_ids
from .thresholds import kde_crossing, rates

# A progress factory: (description, total steps) -> advance(n).
Progress = Callable[[str, int], Callable[[int], None]]


def no_progress(description: str, total: int) -> Callable[[int], None]:
    """A progress factory that shows nothing."""
    return lambda n: None


@dataclass
class CalibrationResult:
    """Everything calibration measured and chose; `document` is the policy file's content."""

    document: dict
    angles: np.ndarray  # [N, layers, heads]
    unsafe: np.ndarray  # [N] bool
    held_out: np.ndarray  # [N] bool
    head: HeadChoice
    oh_scores: np.ndarray  # [N] the chosen head's angle in the configuration the threshold used
    ptr_ranking: list[dict]
    align_ranking: list[dict]
    detector: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def policy(self) -> GuardPolicy:
        """The runtime policy calibration chose."""
        return GuardPolicy.from_dict(self.document["policy"])


def check_device(device: str) -> torch.device:
    """The torch device calibration runs on, or a one-line error if this torch cannot use it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CalibrationOptionError(
            f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        kind = resolved.type  # mps, xpu, ...: torch.mps or torch.backends.mps says
        backend = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise CalibrationOptionError(
                f"--device {device}: this torch cannot run on {resolved.type}; use cpu or cuda"
            )
        return resolved
    if not torch.cuda.is_available():
        build = "is a CPU-only build" if torch.version.cuda is None else "finds no CUDA device"
        raise CalibrationOptionError(
            f"--device {device}: torch {torch.__version__} {build}; "
            "use --device cpu, or install a CUDA build of torch"
        )
    index = resolved.index
    if index is not None and index >= torch.cuda.device_count():
        raise CalibrationOptionError(
            f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s); "
            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return resolved


def _oh_record(
    head: HeadChoice, scores: np.ndarray, threshold: float, unsafe: np.ndarray, held: np.ndarray
) -> dict:
    """Oh Defense's entry: the head, its threshold and TPR/FPR on both parts."""
    record = head.to_dict()
    record["sweep_threshold_degrees"] = record.pop("threshold_degrees")
    record["threshold_degrees"] = threshold
    record["rule"] = (
        f"keep heads with mean safe angle < {SAFE_PERCENTILE:g}th percentile of the heads' means; "
        "rank by mean unsafe - mean safe angle; threshold = KDE crossing with best balanced "
        "accuracy; flag angle > threshold"
    )
    record["calibration"] = rates(scores[~held], unsafe[~held], threshold).to_dict()
    record["held_out"] = (
        rates(scores[held], unsafe[held], threshold).to_dict() if held.any() else None
    )
    return record


def _oh_threshold(scores: np.ndarray, unsafe: np.ndarray, held: np.ndarray) -> float:
    """The KDE-crossing threshold on the calibration part."""
    return kde_crossing(scores[~held & ~unsafe], scores[~held & unsafe])


def calibrate(
    source: str | Path,
    data: str | Path,
    *,
    target_fpr: float = 0.05,
    holdout: float = 0.3,
    seed: int = 0,
    batch_size: int = 8,
    k_fraction: float = DEFAULT_PTR_K_FRACTION,
    ptr_widths: tuple[int, ...] = PTR_WIDTHS,
    align_gammas: tuple[float, ...] = ALIGN_GAMMAS,
    detector: str | Path | None = None,
    bundle: str | Path | None = None,
    oh_with_ptr: bool = True,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> CalibrationResult:
    """Sweep Oh's heads, rank SafePTR windows and GuardAlign strengths, set the thresholds.

    Prompts and images are laid out by the runtime's own code, from `bundle`'s files when one
    is given, else from the files the exporter would write (see `prompts.py`). With
    `oh_with_ptr` (bundles carrying SafePTR), the chosen head's threshold is set on the angle
    the exported decoder outputs with the chosen window pruning at `k_fraction`.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationOptionError(f"--target-fpr must be in [0, 1), not {target_fpr}")
    if batch_size < 1:
        raise CalibrationOptionError(f"--batch-size must be at least 1, not {batch_size}")
    device = str(check_device(device))
    started, timings = time.perf_counter(), {}
    samples = read_samples(data)
    _, held_samples = split_holdout(samples, holdout, seed)
    held_set = set(held_samples)
    held = np.array([s in held_set for s in samples])
    unsafe = np.array([s.unsafe for s in samples])
    loaded = load_source(resolve_source(str(source)))
    spec, model = family_for(loaded.model.config), loaded.model.to(device)
    text = model.config.text_config
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    timings["load"] = time.perf_counter() - started

    tick = time.perf_counter()
    encoder = PromptEncoder.for_source(loaded, bundle)
    advance = progress("encoding prompts", 2 * len(samples))
    items, prefixed = [], []
    for sample in samples:
        plain, with_prefix = encoder.encode_variants(sample, (None, ALIGN_SAFETY_PREFIX))
        items.append(plain)
        prefixed.append(with_prefix)
        advance(2)
    timings["encode"] = time.perf_counter() - tick

    tick = time.perf_counter()
    steps = -(-len(samples) // batch_size) * layers
    sweep = make_decoder(spec, model, GuardSettings())
    advance = progress("oh head sweep", steps)
    angles = sweep_angles(sweep, batches(items, batch_size, device), heads, advance)
    head = select_head(angles[~held], unsafe[~held])
    timings["oh_sweep"] = time.perf_counter() - tick

    tick = time.perf_counter()
    refusal_ids = refusal_token_ids(loaded.tokenizer)
    windows = len(candidate_windows(layers, ptr_widths))
    embed = spec.resolve(model, spec.embed_tokens)
    references = reference_states(sweep, embed, loaded.tokenizer)
    ptr_ranking = search_windows(
        spec, model, loaded.tokenizer, items, unsafe, held, refusal_ids,
        k_fraction=k_fraction, widths=ptr_widths, batch_size=batch_size,
        references=references, on_step=progress("SafePTR windows", windows),
    )  # fmt: skip
    timings["ptr_window"] = time.perf_counter() - tick

    tick = time.perf_counter()
    oh_scores = angles[:, head.layer, head.head]
    oh_config = "the muted branch alone (no SafePTR pruning)"
    if oh_with_ptr:
        window = tuple(ptr_ranking[0]["window"])
        settings = GuardSettings(ptr_window=window, oh_layer=head.layer, oh_head=head.head)
        decoder = make_decoder(spec, model, settings, references[window[0]])
        guards = ptr_guards(k_fraction)
        oh_scores = guarded_angles(decoder, batches(items, batch_size, device), guards)
        oh_config = f"the exported decoder's oh_angle with SafePTR {list(window)} at K {k_fraction}"
    oh_threshold = _oh_threshold(oh_scores, unsafe, held)
    timings["oh_threshold"] = time.perf_counter() - tick

    tick = time.perf_counter()
    align_ranking = search_strength(
        spec, model, prefixed, unsafe, held, refusal_ids, gammas=align_gammas,
        batch_size=batch_size,
        on_step=progress("GuardAlign strengths", len(layer_ranges(layers)) * len(align_gammas)),
    )  # fmt: skip
    timings["align_strength"] = time.perf_counter() - tick

    tick = time.perf_counter()
    scores, detector_record = {}, {"skipped": "no detector given (--detector) or in the bundle"}
    if detector is not None:
        scores = detector_scores(detector, samples)
        detector_record = {"source": str(detector)}
        detector_record |= detector_thresholds(scores, unsafe, held, target_fpr)
    timings["detector"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started

    ptr, align = ptr_ranking[0], align_ranking[0]
    ot = detector_record.get("ot", {})
    policy = GuardPolicy(
        oh_threshold=oh_threshold,
        ptr_k_fraction=k_fraction,
        align_gamma=align["align_gamma"],
        detector_threshold=ot.get("threshold"),
    )
    document = {
        "policy": policy.to_dict(),
        "calibration": {
            "vlmguard_version": __version__,
            "source": str(source),
            "model": {"layers": layers, "heads": heads, "family": spec.name},
            "data": {
                "file": str(data),
                "sha256": data_hash(data, samples),
                "samples": len(samples),
                "unsafe": int(unsafe.sum()),
                "safe": int((~unsafe).sum()),
                "holdout_fraction": holdout,
                "held_out_samples": int(held.sum()),
                "seed": seed,
            },
            "target_fpr": target_fpr,
            "oh": {
                **_oh_record(head, oh_scores, oh_threshold, unsafe, held),
                "threshold_angles": oh_config,
            },
            "ptr": {
                "window": ptr["window"],
                "k_fraction": k_fraction,
                "calibration": ptr["calibration"],
                "held_out": ptr["held_out"] if held.any() else None,
                "ranking": ptr_ranking,
            },
            "align": {
                "layers": align["layers"],
                "range": align["range"],
                "gamma": align["gamma"],
                "calibration": align["calibration"],
                "held_out": align["held_out"] if held.any() else None,
                "ranking": align_ranking,
            },
            "detector": detector_record,
            "refusal_proxy": {
                "openings": list(REFUSAL_OPENINGS),
                "token_ids": refusal_ids,
                "rule": "probability of a refusal opening's first token at the first answer "
                "position; candidates within 10% changed safe first tokens first, then by the "
                "unsafe gain over the unguarded baseline",
            },
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
        },
    }
    return CalibrationResult(
        document, angles, unsafe, held, head, oh_scores, ptr_ranking, align_ranking, scores
    )
