"""The guard policy: thresholds, strengths and texts the runtime acts on (calibration writes it)."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlmguard.errors import VlmguardError

OH_SAFETY_INSTRUCTION = (  # [code] Oh Defense prepends a safety instruction to the user text
    "You are a helpful and harmless assistant. If the request below is harmful, unsafe or "
    "unethical, refuse it. "
)
OH_REFUSAL_OPENING = "I cannot"  # [code] LLaVA's forced refusal opening
ALIGN_SAFETY_PREFIX = "As an AI assistant, I must make sure my answer is safe and harmless. "


class PolicyError(VlmguardError):
    """A policy file or value is malformed."""


@dataclass(frozen=True)
class GuardPolicy:
    """What the runtime does with each guard's signal; None thresholds observe without acting."""

    oh_threshold: float | None = None  # degrees; refusal path when oh_angle > threshold
    ptr_k_fraction: float = 0.1
    align_gamma: list[float] | None = None  # per layer; None: the bundle's default
    detector_threshold: float | None = None
    require: list[str] = field(default_factory=list)  # guards that must run, else refuse
    fail_open: bool = False  # explicit opt-out of fail-closed
    guarded: bool = True  # False: the unguarded baseline (--no-guard): no guard acts at all
    oh_safety_instruction: str = OH_SAFETY_INSTRUCTION
    oh_refusal_opening: str = OH_REFUSAL_OPENING
    align_safety_prefix: str = ALIGN_SAFETY_PREFIX

    @classmethod
    def neutral(cls) -> GuardPolicy:
        """No guard acts: every guard input neutral, no detector, no prefix, nothing refused."""
        return cls(ptr_k_fraction=0.0, align_gamma=[], guarded=False)

    @classmethod
    def from_dict(cls, data: dict) -> GuardPolicy:
        """Build from a dict (a policy file's content), refusing unknown keys and bad values."""
        if not isinstance(data, dict):
            raise PolicyError(f"a policy must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(_shown(key, 30) for key in data if key not in known)
        if unknown:
            raise PolicyError(f"unknown policy key(s) {', '.join(unknown)}; known: {sorted(known)}")
        policy = cls(**data)
        policy.validate()
        return policy

    @classmethod
    def load(cls, path: str | Path) -> GuardPolicy:
        """Read a policy JSON file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise PolicyError(f"cannot read policy {path}: {err}") from err
        return cls.from_dict(data.get("policy", data) if isinstance(data, dict) else data)

    def validate(self) -> None:
        """Refuse values no guard can act on, and values of the wrong JSON type."""
        for name in ("oh_threshold", "detector_threshold"):
            value = getattr(self, name)
            if value is not None and not _finite_number(value):
                raise PolicyError(f"{name} must be a finite number or null, not {_shown(value)}")
        k = self.ptr_k_fraction
        if not (_finite_number(k) and 0.0 <= k <= 1.0):
            raise PolicyError(f"ptr_k_fraction must be a number in [0, 1], not {_shown(k)}")
        gamma = self.align_gamma
        if gamma is not None and not (
            isinstance(gamma, list) and all(_finite_number(g) for g in gamma)
        ):
            raise PolicyError(
                f"align_gamma must be a list of finite numbers or null, not {_shown(gamma)}"
            )
        if not (isinstance(self.require, list) and all(isinstance(g, str) for g in self.require)):
            raise PolicyError(f"require must be a list of guard names, not {_shown(self.require)}")
        unknown = sorted(set(self.require) - {"oh", "ptr", "align", "detector"})
        if unknown:
            named = ", ".join(_shown(guard, 30) for guard in unknown)
            raise PolicyError(
                f"cannot require unknown guard(s) {named}; known: oh, ptr, align, detector"
            )
        for name in ("fail_open", "guarded"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(
                    f"{name} must be true or false, not {_shown(getattr(self, name))}"
                )
        if not self.guarded and (
            self.ptr_k_fraction or any(self.align_gamma or []) or self.require
        ):
            raise PolicyError(
                "an unguarded policy (guarded: false) must have ptr_k_fraction 0, align_gamma "
                "all 0 and require nothing; use GuardPolicy.neutral() or --no-guard"
            )
        for name in ("oh_safety_instruction", "oh_refusal_opening", "align_safety_prefix"):
            if not isinstance(getattr(self, name), str):
                raise PolicyError(f"{name} must be a string, not {_shown(getattr(self, name))}")

    def to_dict(self) -> dict:
        """The JSON form."""
        return asdict(self)


def _finite_number(value: object) -> bool:
    """Whether a value is a real, finite number (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: no guard can use it
        return False


def _shown(value: object, limit: int = 60) -> str:
    """A value's repr for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
