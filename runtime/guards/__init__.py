"""The guards' online side: one stage per guard and the fail-closed rule they share."""

from __future__ import annotations

import numpy as np

from ..policy import GuardPolicy
from .align import AlignStage
from .base import DecoderGuardStage, FailRule
from .oh import OhStage
from .ptr import PtrStage

__all__ = ["DecoderGuardStage", "FailRule", "decoder_stages"]


def decoder_stages(
    defenses: set[str], policy: GuardPolicy, rule: FailRule, gamma: np.ndarray
) -> dict[str, DecoderGuardStage]:
    """The stages of the guards a bundle's decoder carries, in the order they act."""
    stages: dict[str, DecoderGuardStage] = {}
    if "align" in defenses:
        stages["align"] = AlignStage(policy, rule, gamma=gamma)
    if "ptr" in defenses:
        stages["ptr"] = PtrStage(policy, rule)
    if "oh" in defenses:
        stages["oh"] = OhStage(policy, rule)
    return stages
