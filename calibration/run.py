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
from vlmguard.export.source import load_source, resolve_source, source_identity
from vlmguard.guards import DEFAULT_PTR_K_FRACTION, GuardSettings
from vlmguard.manifest import Manifest
from vlmguard.runtime.policy import ALIGN_SAFETY_PREFIX, GuardPolicy

from .align_strength import ALIGN_GAMMAS, layer_ranges, search_strength
from .data import data_hash, read_samples, split_holdout
from .detector_scores import detector_scores, detector_thresholds
from .errors import CalibrationOptionError
from .oh_sweep import SAFE_PERCENTILE, HeadChoice, guarded_angles, select_head, sweep_angles
from .policy_writer import check_bundle_source
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


def _part(unsafe: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, str]:
    """Where separation is measured: the held-out part, or the calibration part if it must."""
    if (held & unsafe).any() and (held & ~unsafe).any():
        return held, "held-out"
    return ~held, "calibration-part (the held-out part lacks a label)"


def _mean_gap(scores: np.ndarray, unsafe: np.ndarray, rows: np.ndarray) -> float | None:
    """Mean unsafe minus mean safe score over `rows` (finite scores only), None if a label lacks."""
    rows = rows & np.isfinite(scores)
    if not ((rows & unsafe).any() and (rows & ~unsafe).any()):
        return None
    return float(scores[rows & unsafe].mean() - scores[rows & ~unsafe].mean())


def observe_only_reason(separation: float | None, part: str, what: str, off: str) -> str | None:
    """Why a guard stays observe-only (its separation is not positive), or None to turn it on."""
    if separation is None:
        return f"its separation cannot be measured (no labelled samples of both kinds); {off}"
    if not separation > 0:
        return f"{part} separation {separation:.3g} <= 0 ({what}); {off}"
    return None


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
    assume_same_source: bool = False,
) -> CalibrationResult:
    """Sweep Oh's heads, rank SafePTR windows and GuardAlign strengths, set the thresholds.

    Prompts and images are laid out by the runtime's own code, from `bundle`'s files when one
    is given, else from the files the exporter would write (see `prompts.py`). With
    `oh_with_ptr` (bundles carrying SafePTR), the chosen head's threshold is set on the angle
    the exported decoder outputs with the chosen window pruning at `k_fraction`.

    A guard whose separation (unsafe minus safe, on the held-out part) is not positive is left
    observe-only: oh_threshold null, ptr_k_fraction 0, align_gamma 0, no detector threshold;
    `calibration.observe_only` says why. With `bundle`, SOURCE must be the model the bundle was
    exported from (`check_bundle_source`), checked before the model loads.
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
    source_dir = resolve_source(str(source))
    identity = source_identity(source_dir)
    if bundle is not None:
        check_bundle_source(Manifest.read(Path(bundle)), identity, source, bundle,
                            assume_same_source)  # fmt: skip
    loaded = load_source(source_dir)
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
    part, part_name = _part(unsafe, held)
    observe_only = {}
    ptr = ptr_ranking[0]
    ptr_figures = ptr["held_out"] if part_name == "held-out" else ptr["calibration"]
    reason = observe_only_reason(
        ptr_figures["separation"], part_name,
        "the window does not raise refusals on unsafe samples more than on safe ones",
        "ptr_k_fraction 0 (observe-only)",
    )  # fmt: skip
    if reason:
        observe_only["ptr"] = reason
    ptr_k = 0.0 if reason else k_fraction

    tick = time.perf_counter()
    oh_scores = angles[:, head.layer, head.head]
    oh_config = "the muted branch alone (no SafePTR pruning)"
    pruned_window = None
    if oh_with_ptr and ptr_k > 0:
        window = tuple(ptr_ranking[0]["window"])
        settings = GuardSettings(ptr_window=window, oh_layer=head.layer, oh_head=head.head)
        decoder = make_decoder(spec, model, settings, references[window[0]])
        guards = ptr_guards(k_fraction)
        oh_scores = guarded_angles(decoder, batches(items, batch_size, device), guards)
        oh_config = (
            f"the exported decoder's oh_angle with SafePTR [{window[0]}, {window[1]}) "
            f"at K {k_fraction}"
        )
        pruned_window = list(window)
    elif oh_with_ptr:
        oh_config += ": SafePTR is observe-only (K 0), so the exported decoder prunes nothing"
    oh_threshold = _oh_threshold(oh_scores, unsafe, held)
    oh_separation = _mean_gap(oh_scores, unsafe, part)
    reason = observe_only_reason(
        oh_separation, part_name,
        f"layer {head.layer} head {head.head}: the unsafe angles are not above the safe ones",
        "oh_threshold null (observe-only)",
    )  # fmt: skip
    if reason:
        observe_only["oh"] = reason
    timings["oh_threshold"] = time.perf_counter() - tick

    tick = time.perf_counter()
    align_ranking = search_strength(
        spec, model, prefixed, unsafe, held, refusal_ids, gammas=align_gammas,
        batch_size=batch_size,
        on_step=progress("GuardAlign strengths", len(layer_ranges(layers)) * len(align_gammas)),
    )  # fmt: skip
    timings["align_strength"] = time.perf_counter() - tick
    align = align_ranking[0]
    align_figures = align["held_out"] if part_name == "held-out" else align["calibration"]
    reason = observe_only_reason(
        align_figures["separation"], part_name,
        "the strength does not raise refusals on unsafe samples more than on safe ones",
        "align_gamma 0 on every layer (observe-only)",
    )  # fmt: skip
    if reason:
        observe_only["align"] = reason

    tick = time.perf_counter()
    scores, detector_record = {}, {"skipped": "no detector given (--detector) or in the bundle"}
    if detector is not None:
        scores = detector_scores(detector, samples)
        detector_record = {"source": str(detector)}
        detector_record |= detector_thresholds(scores, unsafe, held, target_fpr)
        ot = detector_record.get("ot", {})
        if "threshold" in ot:
            rows, name = _part(unsafe & np.isfinite(scores["ot"]), held & np.isfinite(scores["ot"]))
            ot["separation"] = _mean_gap(scores["ot"], unsafe, rows)
            reason = observe_only_reason(
                ot["separation"], name, "the unsafe images' OT scores are not above the safe ones",
                "detector_threshold null (not calibrated: the detector keeps its exported "
                "thresholds)",
            )  # fmt: skip
            if reason:
                observe_only["detector"] = reason
    timings["detector"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started

    ot = detector_record.get("ot", {})
    oh_on = "oh" not in observe_only
    policy = GuardPolicy(
        oh_threshold=oh_threshold if oh_on else None,
        ptr_k_fraction=ptr_k,
        align_gamma=[0.0] * layers if "align" in observe_only else align["align_gamma"],
        detector_threshold=None if "detector" in observe_only else ot.get("threshold"),
        calibrated_for={
            "source_identity": identity["sha256"],
            "num_layers": layers,
            "oh": {
                "layer": head.layer,
                "head": head.head,
                "ptr_window": pruned_window,
                "ptr_k_fraction": k_fraction if pruned_window else None,
            }
            if oh_on
            else None,
            "ptr": {"window": list(ptr["window"])} if ptr_k > 0 else None,
        },
    )
    document = {
        "policy": policy.to_dict(),
        "calibration": {
            "vlmguard_version": __version__,
            "source": str(source),
            "source_identity": identity,
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
            "observe_only": observe_only,
            "separation_part": part_name,
            "oh": {
                **_oh_record(head, oh_scores, oh_threshold, unsafe, held),
                "threshold_angles": oh_config,
                "separation_degrees": oh_separation,
                "observe_only": observe_only.get("oh"),
            },
            "ptr": {
                "window": ptr["window"],
                "k_fraction": k_fraction,
                "separation": ptr_figures["separation"],
                "observe_only": observe_only.get("ptr"),
                "calibration": ptr["calibration"],
                "held_out": ptr["held_out"] if held.any() else None,
                "ranking": ptr_ranking,
            },
            "align": {
                "layers": align["layers"],
                "range": align["range"],
                "gamma": align["gamma"],
                "separation": align_figures["separation"],
                "observe_only": observe_only.get("align"),
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
