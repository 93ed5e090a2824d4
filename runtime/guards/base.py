"""The online side of a guard: the feeds it adds, the outputs it checks, and one fail-closed rule.

Every guard stage (`align.py`, `ptr.py`, `oh.py`, `detector.py`) reports through the same two
rules here: a guard that cannot judge refuses the request (or, when the policy opts into
fail_open, is skipped with a `fail_open` decision), and a model stage of a guarded request that
fails refuses the requests concerned (or raises `ModelRunError` where no refusal applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..engine import DecoderState
from ..policy import GuardPolicy
from ..prompting import EncodedPrompt
from ..request import Batch, ModelRunError, Request


class GuardStageError(Exception):
    """A guard stage could not produce a usable result (raised inside the pipeline only)."""


@dataclass(frozen=True)
class FailRule:
    """Fail closed: what a failing guard or model stage does to the requests it concerns."""

    policy: GuardPolicy
    guarded: bool  # the bundle carries in-model guards (else nothing can refuse)

    def guard_failed(self, row: Request, stage: str, reason: str) -> None:
        """Refuse, or, if the policy opted out, note it and go on unguarded."""
        if self.policy.fail_open:
            row.report.decide(stage, "fail_open", f"{reason}; continuing unguarded (fail_open)")
            return
        row.refuse(stage, reason)

    def model_failed(
        self, rows: list[Request], stage: str, reason: str, err: BaseException | None = None
    ) -> None:
        """A model stage failed for these requests: refuse them, or raise where none can refuse."""
        if not rows:
            return
        if self.policy.fail_open or not self.guarded:
            raise ModelRunError(f"{stage}: {reason}") from err
        for row in rows:
            row.refuse(stage, reason)


@dataclass(frozen=True)
class PrefillLayout:
    """Where each request's prompt sits in the left-padded prefill batch."""

    encoded: list[EncodedPrompt]
    offsets: list[int]  # left padding of each row
    width: int  # padded sequence length

    def row_mask(self, attr: str, only: list[bool] | None = None) -> np.ndarray:
        """[B, width] int64: 1 at each prompt's rows `attr` (in the batch rows `only` keeps)."""
        out = np.zeros((len(self.encoded), self.width), np.int64)
        for i, (enc, offset) in enumerate(zip(self.encoded, self.offsets, strict=True)):
            if only is None or only[i]:
                out[i, np.asarray(getattr(enc, attr), dtype=np.int64) + offset] = 1
        return out


class DecoderGuardStage:
    """A guard carried in the decoder graph: its feeds at prefill and decode, its checks."""

    name: ClassVar[str]

    def __init__(self, policy: GuardPolicy, rule: FailRule) -> None:
        self.policy, self.rule = policy, rule

    def prefill_feeds(self, rows: list[Request], layout: PrefillLayout) -> dict[str, np.ndarray]:
        """The guard's inputs for a prefill."""
        return {}

    def decode_feeds(self, size: int) -> dict[str, np.ndarray]:
        """The guard's inputs every decode step of a batch of `size` shares."""
        return {}

    def begin_decode(self, batch: Batch, feeds: dict[str, np.ndarray]) -> None:
        """Keep whatever per-step input this guard carries through a batch's decode loop."""

    def step_feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        """The guard's inputs that change with each decode step."""
        return {}

    def after_prefill(
        self, rows: list[Request], outputs: dict[str, np.ndarray], layout: PrefillLayout
    ) -> None:
        """Check the guard's prefill outputs and act on them (raise: the guard failed)."""

    def after_step(self, batch: Batch, before: DecoderState, after: DecoderState) -> None:
        """Check what a decode step did to the guard's state."""
