"""The guard policy: thresholds, strengths and texts the runtime acts on (calibration writes it)."""

from __future__ import annotations

import json
import math
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
    oh_safety_instruction: str = OH_SAFETY_INSTRUCTION
    oh_refusal_opening: str = OH_REFUSAL_OPENING
    align_safety_prefix: str = ALIGN_SAFETY_PREFIX

    @classmethod
    def neutral(cls) -> GuardPolicy:
        """Every guard input neutral and no action: the model as exported, unguarded."""
        return cls(ptr_k_fraction=0.0, align_gamma=[])

    @classmethod
    def from_dict(cls, data: dict) -> GuardPolicy:
        """Build from a dict (a policy file's content), refusing unknown keys and bad values."""
        if not isinstance(data, dict):
            raise PolicyError("a policy must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
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
        except (OSError, ValueError) as err:
            raise PolicyError(f"cannot read policy {path}: {err}") from err
        return cls.from_dict(data.get("policy", data) if isinstance(data, dict) else data)

    def validate(self) -> None:
        """Refuse values no guard can act on."""
        for name in ("oh_threshold", "detector_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
                raise PolicyError(f"{name} must be a finite number or null, not {value!r}")
        if not 0.0 <= float(self.ptr_k_fraction) <= 1.0:
            raise PolicyError(f"ptr_k_fraction must be in [0, 1], not {self.ptr_k_fraction}")
        unknown = sorted(set(self.require) - {"oh", "ptr", "align", "detector"})
        if unknown:
            raise PolicyError(f"cannot require unknown guard(s) {', '.join(unknown)}")

    def to_dict(self) -> dict:
        """The JSON form."""
        return asdict(self)
