"""Model families, one module each, in a registry keyed by `config.model_type`."""

from __future__ import annotations

from vlmguard.errors import UnsupportedModelError

from .base import FamilySpec
from .llava import LLAVA

__all__ = ["FAMILIES", "LLAVA", "FamilySpec", "family_for", "supported_summary"]

FAMILIES: dict[str, FamilySpec] = {
    model_type: family for family in (LLAVA,) for model_type in family.model_types
}


def supported_summary() -> str:
    """One line naming every supported family and its towers, for error messages."""
    return "; ".join(family.summary() for family in {id(f): f for f in FAMILIES.values()}.values())


def family_for(config: object) -> FamilySpec:
    """Pick the family for a loaded config, or say which families are supported."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {supported_summary()}"
        )
    family.check(config)
    return family
