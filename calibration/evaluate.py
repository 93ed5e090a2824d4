"""Run a guarded bundle over a labelled dataset and record, per sample, what the guards did.

Only the runtime (onnxruntime, numpy, Pillow, tokenizers) is needed: no torch. A sample counts as
refused when the runtime refused it (fail-closed or a policy requirement), when Oh Defense took
its refusal path, or when the refusal judge (by default the phrase matcher in
`refusal_matcher.py`) finds a refusal in the text; `refused_by` says which of the three.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from vlmguard.errors import VlmguardError

from .data import Sample, data_hash
from .errors import CalibrationOptionError
from .metrics import Outcome, metrics_by_category
from .refusal_matcher import RefusalMatcher

RefusalJudge = Callable[[str], "str | bool | None"]  # text -> matched phrase, True/False or None
ACTING = ("flag", "calibrate", "refusal_path", "refuse")  # decisions that changed the request
TEXT_CHARS = 300  # how much of each answer the record keeps


def guards_fired(report: object) -> list[str]:
    """The report's acting decisions as "stage:action" (e.g. "detector:flag"), in order, once."""
    fired = [f"{d.stage}:{d.action}" for d in report.decisions if d.action in ACTING]
    return list(dict.fromkeys(fired))


def judge(
    sample: Sample, text: str, report: object, refusal: RefusalJudge, text_chars: int = TEXT_CHARS
) -> Outcome:
    """One sample's outcome from its answer text and GuardReport."""
    fired = guards_fired(report)
    refused_by = ["runtime"] if report.refused else []
    if "oh:refusal_path" in fired:
        refused_by.append("oh_refusal_path")
    verdict = refusal(text)
    if verdict:
        refused_by.append("phrase")
    return Outcome(
        label=sample.label,
        refused=bool(refused_by),
        category=sample.category,
        id=sample.id or f"line {sample.line}",
        source=sample.source,
        refused_by=refused_by,
        matched_phrase=verdict if isinstance(verdict, str) else None,
        guards_fired=fired,
        pruned_tokens=report.pruned_tokens,
        scores=dict(report.scores),
        refusal_reason=report.refusal_reason,
        text=text[:text_chars],
    )


def _chunks(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    """Consecutive slices of at most `size` samples."""
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def evaluate(
    vlm: object,
    samples: Iterable[Sample],
    refusal: RefusalJudge | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 1,
    text_chars: int = TEXT_CHARS,
    progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Answer every sample with `vlm` (a GuardedVLM), greedy, and judge each answer."""
    if batch_size < 1:
        raise CalibrationOptionError(f"the batch size must be at least 1, not {batch_size}")
    refusal = refusal or RefusalMatcher()
    outcomes = []
    for chunk in _chunks(list(samples), batch_size):
        try:
            results = vlm.generate_batch([(s.image, s.prompt) for s in chunk], max_new_tokens)
        except VlmguardError as err:
            names = ", ".join(s.id or f"line {s.line}" for s in chunk)
            raise VlmguardError(f"{names}: {err}") from err
        for sample, result in zip(chunk, results, strict=True):
            outcomes.append(judge(sample, result.text, result.report, refusal, text_chars))
        if progress is not None:
            progress(len(chunk))
    return outcomes


def eval_document(
    vlm: object,
    data: Path,
    samples: list[Sample],
    outcomes: list[Outcome],
    settings: dict,
    refusal: RefusalJudge,
) -> dict:
    """The JSON record of one evaluation: what ran, on what, the metrics and every sample."""
    describe = getattr(refusal, "describe", None)
    return {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bundle": str(vlm.engine.bundle),
        "defenses": sorted(vlm.defenses) + (["detector"] if vlm.detector is not None else []),
        "policy": asdict(vlm.policy),
        "data": str(data),
        "data_sha256": data_hash(data, samples),
        "settings": settings,
        "refusal_judge": describe() if describe else {"kind": "callable", "name": repr(refusal)},
        "metrics": metrics_by_category(outcomes),
        "samples": [o.to_dict() for o in outcomes],
    }
