"""The runtime side of each model family, keyed by the name guard_config.json records."""

from __future__ import annotations

from pathlib import Path

from vlmguard.errors import BundleError
from vlmguard.manifest import Manifest

from .base import RuntimeFamily
from .llava import LlavaRuntime

__all__ = ["FAMILIES", "RuntimeFamily", "runtime_family"]

FAMILIES: dict[str, type[RuntimeFamily]] = {family.name: family for family in (LlavaRuntime,)}


def runtime_family(bundle: Path, manifest: Manifest) -> RuntimeFamily:
    """The runtime family of a bundle, or a one-line error naming the ones this vlmguard knows."""
    name = manifest.model.family
    family = FAMILIES.get(name)
    if family is None:
        raise BundleError(
            f"{bundle} is a {name!r} bundle; this vlmguard runs {', '.join(FAMILIES)}: "
            "upgrade vlmguard or re-export the bundle"
        )
    return family(bundle, manifest)
