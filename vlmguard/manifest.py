"""The bundle's guard_config.json: format version, file inventory and digests.

Shared by both halves: the exporter writes it, the runtime reads and checks it. Lean on
purpose (standard library only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "guard_config.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def inventory(bundle: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file in the bundle except the manifest itself."""
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        relative = path.relative_to(bundle).as_posix()
        if relative != MANIFEST_NAME:
            files[relative] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def write_manifest(bundle: Path, manifest: dict) -> Path:
    """Write guard_config.json with the format version and a fresh file inventory."""
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": inventory(bundle)}
    path = bundle / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(bundle: Path) -> dict:
    """Read guard_config.json, refusing a missing, unreadable or newer-format one."""
    path = Path(bundle) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{bundle} has no {MANIFEST_NAME}: is it a bundle from `vlmguard export`?"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} is not readable JSON ({err}); re-export the bundle") from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:  # bool is no version
        raise BundleError(
            f"{path} has format version {version!r}; this vlmguard reads up to "
            f"{FORMAT_VERSION}: upgrade vlmguard or re-export the bundle"
        )
    return manifest
