"""Write the policy file, and write it into a bundle (re-exporting the decoder if needed).

A bundle is never written in place: see `apply_to_bundle`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vlmguard.errors import BundleError
from vlmguard.export.families import family_for
from vlmguard.export.graphs import decoder_plan
from vlmguard.export.guards.ptr import ptr_reference
from vlmguard.export.onnx_io import convert_to_fp16, export_onnx
from vlmguard.export.source import load_source, resolve_source, source_identity
from vlmguard.guards import GuardSettings, settings_record
from vlmguard.manifest import MANIFEST_NAME, Manifest, write_manifest
from vlmguard.staging import staged_directory

POLICY_FILE = "policy.json"  # the runtime's GuardedVLM.load reads it from a bundle


def write_policy(path: str | Path, document: dict) -> Path:
    """Write the policy document ({"policy": ..., "calibration": ...}) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def check_bundle_source(
    manifest: Manifest,
    identity: dict,
    source: str | Path,
    bundle: str | Path,
    assume_same_source: bool = False,
) -> None:
    """Refuse, in one line, calibrating `bundle` with a SOURCE it was not exported from.

    The exporter records the source's identity (`source_identity`: SHA-256 of config.json and
    the weight files) in guard_config.json. A bundle exported before that has no record: it is
    refused too, unless `assume_same_source` (`--assume-same-source`) says SOURCE is its model.
    """
    recorded = manifest.source_identity
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        if assume_same_source:
            return
        raise BundleError(
            f"{bundle} records no source identity (exported before vlmguard recorded one), so "
            f"{source} cannot be checked as its model; re-export it (vlmguard export {source} "
            f"--out {bundle} --force) or pass --assume-same-source if {source} is its model"
        )
    if recorded["sha256"] == identity["sha256"]:
        return
    theirs, ours = recorded.get("files", {}), identity["files"]
    differ = sorted(n for n in set(theirs) | set(ours) if theirs.get(n) != ours.get(n))
    raise BundleError(
        f"{source} is not the model {bundle} was exported from ({manifest.source or '?'}; "
        f"{', '.join(differ) or 'files'} differ); pass that model as SOURCE, or export "
        f"{source} into a bundle of its own (vlmguard export {source} --out NEW_BUNDLE)"
    )


def chosen_settings(manifest: Manifest, document: dict) -> GuardSettings:
    """The bundle's carried guards with calibration's head and window in place of the baked ones."""
    carried = manifest.defenses
    choice = document["calibration"]
    oh, ptr = choice["oh"], choice["ptr"]
    return GuardSettings(
        align="align" in carried,
        ptr_window=tuple(ptr["window"]) if "ptr" in carried else None,
        oh_layer=oh["layer"] if "oh" in carried else None,
        oh_head=oh["head"] if "oh" in carried else None,
    )


def reexport_decoder(
    source: str | Path, staging: Path, manifest: Manifest, settings: GuardSettings
) -> None:
    """Export the guarded decoder with new settings into `staging`, a copy of the bundle."""
    loaded = load_source(resolve_source(str(source)))
    spec = family_for(loaded.model.config)
    reference = None
    if settings.ptr:
        reference = ptr_reference(spec, loaded.model, loaded.tokenizer, settings.ptr_window[0])
    plan = decoder_plan(spec, loaded.model, settings, reference)
    target = staging / manifest.graphs["decoder"].file
    fp16 = manifest.dtype == "float16"
    scratch = Path(tempfile.mkdtemp(prefix=".decoder.", dir=staging.parent))
    try:
        path = scratch / (target.name.replace("_fp16", "") if fp16 else target.name)
        export_onnx(plan.module, plan.example, plan.inputs, plan.outputs, path)
        if fp16:
            path = convert_to_fp16(path)
        if path.name != target.name:
            raise BundleError(f"re-exported {path.name} does not match the bundle's {target.name}")
        for name in (target.name, target.name + "_data"):
            (target.parent / name).unlink(missing_ok=True)  # a link: the bundle keeps its file
            if (scratch / name).is_file():
                (scratch / name).rename(target.parent / name)
                (target.parent / name).chmod(0o644)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def link_copy(bundle: Path, staging: Path, leave_out: set[str]) -> None:
    """Fill `staging` with hard links (or copies) of every file of `bundle` but `leave_out`.

    Files the calibration rewrites are left out or unlinked before they are written, so
    writing the copy never writes through a link into the bundle.
    """
    staging.chmod(bundle.stat().st_mode & 0o7777)
    for path in sorted(bundle.rglob("*")):
        relative = path.relative_to(bundle)
        copy = staging / relative
        if path.is_dir() and not path.is_symlink():
            copy.mkdir()
            copy.chmod(path.stat().st_mode & 0o7777)
        elif relative.as_posix() not in leave_out:
            try:
                os.link(path, copy, follow_symlinks=False)
            except OSError:  # no hard links on this file system
                shutil.copy2(path, copy, follow_symlinks=False)


def apply_to_bundle(
    bundle: str | Path,
    document: dict,
    source: str | Path,
    on_step: Callable[[str], None] = lambda text: None,
    assume_same_source: bool = False,
) -> bool:
    """Write the policy into a bundle and rehash it; returns whether the decoder was re-exported.

    As the exporter does, the new bundle is built in a staging directory beside it (hard links
    of the unchanged files) and renamed into place at the end: a failure at any step leaves the
    bundle as it was. `source` must be the model the bundle was exported from, and so must the
    document's (`check_bundle_source`).
    """
    bundle = Path(bundle)
    manifest = Manifest.read(bundle)
    identity = source_identity(resolve_source(str(source)))
    check_bundle_source(manifest, identity, source, bundle, assume_same_source)
    record = document["policy"].get("calibrated_for") or {}
    if record.get("source_identity") not in (None, identity["sha256"]):
        raise BundleError(
            f"the policy was calibrated on another model than {source} "
            f"(source sha256 {record['source_identity'][:12]}); calibrate {source} itself"
        )
    if manifest.source_identity is None:  # an older bundle the user vouched for
        asserted = {**identity, "asserted": "--assume-same-source"}
        manifest = replace(manifest, source_identity=asserted)
    layers = manifest.model.num_layers
    calibrated = document["calibration"]["model"]["layers"]
    if layers != calibrated:
        raise BundleError(
            f"{bundle} has {layers} layers but calibration ran on a {calibrated}-layer model; "
            "pass the bundle exported from the same source"
        )
    settings = chosen_settings(manifest, document)
    changed = settings != manifest.settings
    guards = settings_record(settings, layers)
    if settings.oh:
        guards["oh"]["threshold"] = document["policy"]["oh_threshold"]
    calibration = {
        "policy_file": POLICY_FILE,
        "data_sha256": document["calibration"]["data"]["sha256"],
        "decoder_reexported": changed,
    }
    manifest = replace(manifest, guards=guards, calibration=calibration, files={})
    target = bundle.resolve()
    with staged_directory(target) as staging:
        link_copy(target, staging, {MANIFEST_NAME, POLICY_FILE})
        if changed:
            on_step("re-exporting the decoder with the calibrated head and window")
            reexport_decoder(source, staging, manifest, settings)
        write_policy(staging / POLICY_FILE, document).chmod(0o644)
        on_step("rehashing guard_config.json")
        write_manifest(staging, manifest.to_json()).chmod(0o644)
    return changed
