"""The guard policy: thresholds, strengths and texts the runtime acts on (calibration writes it)."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlmguard.errors import VlmguardError
from vlmguard.guards import GUARD_NAMES
from vlmguard.manifest import Manifest

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
    # What calibration measured the values on (calibration writes it; None: hand-written, not
    # checked). `check_policy_fits` refuses a bundle that bakes something else.
    calibrated_for: dict | None = None

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
        unknown = sorted(set(self.require) - set(GUARD_NAMES))
        if unknown:
            named = ", ".join(_shown(guard, 30) for guard in unknown)
            raise PolicyError(
                f"cannot require unknown guard(s) {named}; known: {', '.join(GUARD_NAMES)}"
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
        if self.calibrated_for is not None:
            _validate_calibrated_for(self.calibrated_for)

    def to_dict(self) -> dict:
        """The JSON form."""
        return asdict(self)


CALIBRATED_FOR_KEYS = ("source_identity", "num_layers", "oh", "ptr")


def _window(value: object) -> bool:
    """Whether a value is a [start, end) layer window of two integers."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _validate_calibrated_for(record: object) -> None:
    """The `calibrated_for` record's shape, strictly: a malformed one is a PolicyError."""

    def bad(what: str, value: object) -> PolicyError:
        return PolicyError(f"calibrated_for.{what} is malformed: {_shown(value)}")

    if not isinstance(record, dict):
        raise PolicyError(f"calibrated_for must be an object or null, not {_shown(record)}")
    unknown = sorted(_shown(key, 30) for key in record if key not in CALIBRATED_FOR_KEYS)
    if unknown:
        raise PolicyError(
            f"unknown calibrated_for key(s) {', '.join(unknown)}; "
            f"known: {list(CALIBRATED_FOR_KEYS)}"
        )
    identity = record.get("source_identity")
    if identity is not None and not isinstance(identity, str):
        raise bad("source_identity", identity)
    layers = record.get("num_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)):
        raise bad("num_layers", layers)
    oh = record.get("oh")
    if oh is not None:
        ints = ("layer", "head")
        if not (
            isinstance(oh, dict)
            and set(oh) == {"layer", "head", "ptr_window", "ptr_k_fraction"}
            and all(isinstance(oh[k], int) and not isinstance(oh[k], bool) for k in ints)
            and (oh["ptr_window"] is None or _window(oh["ptr_window"]))
            and (oh["ptr_k_fraction"] is None or _finite_number(oh["ptr_k_fraction"]))
        ):
            raise bad("oh", oh)
    ptr = record.get("ptr")
    if ptr is not None and not (isinstance(ptr, dict) and set(ptr) == {"window"}
                                and _window(ptr["window"])):  # fmt: skip
        raise bad("ptr", ptr)


def _span(window: object) -> str:
    """A layer window in the one notation used everywhere: half-open [a, b)."""
    return "none" if window is None else f"[{window[0]}, {window[1]})"


def check_policy_fits(
    policy: GuardPolicy, manifest: Manifest, bundle: str | Path = "the bundle"
) -> None:
    """Refuse, in one line, a calibrated policy whose values were measured on something else.

    A policy with a `calibrated_for` record (calibration writes one) must match the bundle: the
    source model (when both record its identity), the layer count, the Oh (layer, head) and the
    SafePTR pruning its oh_threshold was set with, and the SafePTR window its K acts on. Only
    what the policy acts on is compared (a null oh_threshold or a K of 0 has nothing to match).
    Hand-written policies (no record) are not checked. Called by GuardedVLM at load.
    """
    record = policy.calibrated_for
    if record is None:
        return
    source = manifest.source or "SOURCE"
    how = f"recalibrate: vlmguard calibrate {source} --bundle {bundle} --data DATA --out POLICY"

    def refuse(what: str) -> PolicyError:
        return PolicyError(f"the policy does not fit {bundle}: {what}; {how}")

    identity = manifest.source_identity
    bundle_id = identity.get("sha256") if isinstance(identity, dict) else None
    if record.get("source_identity") and bundle_id and record["source_identity"] != bundle_id:
        raise refuse(
            f"it was calibrated on another model (source sha256 {record['source_identity'][:12]}, "
            f"the bundle's {bundle_id[:12]})"
        )
    layers = manifest.model.num_layers
    if record.get("num_layers") is not None and record["num_layers"] != layers:
        raise refuse(
            f"it was calibrated on a {record['num_layers']}-layer model, the bundle has {layers}"
        )
    settings = manifest.settings
    carried, window = manifest.defenses, settings.ptr_window
    head = (settings.oh_layer, settings.oh_head) if settings.oh else None
    ptr = record.get("ptr")
    if ptr is not None and "ptr" in carried and policy.ptr_k_fraction > 0:
        if tuple(ptr["window"]) != window:
            raise refuse(
                f"its ptr_k_fraction was calibrated on SafePTR window {_span(ptr['window'])}, "
                f"the bundle bakes {_span(window)}"
            )
    oh = record.get("oh")
    if oh is not None and head is not None and policy.oh_threshold is not None:
        if (oh["layer"], oh["head"]) != head:
            raise refuse(
                f"its oh_threshold was calibrated on Oh layer {oh['layer']} head {oh['head']}, "
                f"the bundle bakes layer {head[0]} head {head[1]}"
            )
        pruning = window if policy.ptr_k_fraction > 0 else None
        k = policy.ptr_k_fraction if pruning is not None else None
        wanted = tuple(oh["ptr_window"]) if oh["ptr_window"] is not None else None
        if (wanted, oh["ptr_k_fraction"] if wanted else None) != (pruning, k):
            raise refuse(
                f"its oh_threshold was set on angles with SafePTR pruning {_span(wanted)}"
                + (f" at K {oh['ptr_k_fraction']}" if wanted else "")
                + f", here the angle comes with pruning {_span(pruning)}"
                + (f" at K {k}" if pruning else "")
            )


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
