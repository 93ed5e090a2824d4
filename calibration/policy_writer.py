"""Write the policy file, and write it into a bundle (re-exporting the decoder if needed)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vlmguard.errors import BundleError
from vlmguard.export.families import family_for
from vlmguard.export.graphs import decoder_plan
from vlmguard.export.guards.ptr import ptr_reference
from vlmguard.export.onnx_io import convert_to_fp16, export_onnx
from vlmguard.export.source import load_source, resolve_source
from vlmguard.guards import GuardSettings, settings_record
from vlmguard.manifest import read_manifest, write_manifest

POLICY_FILE = "policy.json"  # the runtime's GuardedVLM.load reads it from a bundle


def write_policy(path: str | Path, document: dict) -> Path:
    """Write the policy document ({"policy": ..., "calibration": ...}) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def chosen_settings(manifest: dict, document: dict) -> GuardSettings:
    """The bundle's carried guards with calibration's head and window in place of the baked ones."""
    carried = set(manifest.get("guards", {}).get("defenses", []))
    choice = document["calibration"]
    oh, ptr = choice["oh"], choice["ptr"]
    return GuardSettings(
        align="align" in carried,
        ptr_window=tuple(ptr["window"]) if "ptr" in carried else None,
        oh_layer=oh["layer"] if "oh" in carried else None,
        oh_head=oh["head"] if "oh" in carried else None,
    )


def baked_settings(manifest: dict) -> GuardSettings:
    """The guards a bundle's decoder was exported with, from guard_config.json."""
    guards = manifest.get("guards", {})
    carried = set(guards.get("defenses", []))
    return GuardSettings(
        align="align" in carried,
        ptr_window=tuple(guards["ptr"]["window"]) if "ptr" in carried else None,
        oh_layer=guards["oh"]["layer"] if "oh" in carried else None,
        oh_head=guards["oh"]["head"] if "oh" in carried else None,
    )


def reexport_decoder(
    source: str | Path, bundle: Path, manifest: dict, settings: GuardSettings
) -> None:
    """Export the guarded decoder with new settings, staged, then swap it into the bundle."""
    loaded = load_source(resolve_source(str(source)))
    spec = family_for(loaded.model.config)
    reference = None
    if settings.ptr:
        reference = ptr_reference(spec, loaded.model, loaded.tokenizer, settings.ptr_window[0])
    plan = decoder_plan(spec, loaded.model, settings, reference)
    target = bundle / manifest["graphs"]["decoder"]["file"]
    fp16 = manifest.get("dtype") == "float16"
    with tempfile.TemporaryDirectory(prefix=".calibration.", dir=bundle) as staging:
        path = Path(staging) / (target.name.replace("_fp16", "") if fp16 else target.name)
        export_onnx(plan.module, plan.example, plan.inputs, plan.outputs, path)
        if fp16:
            path = convert_to_fp16(path)
        if path.name != target.name:
            raise BundleError(f"re-exported {path.name} does not match the bundle's {target.name}")
        for name in (target.name, target.name + "_data"):
            (target.parent / name).unlink(missing_ok=True)
            if (Path(staging) / name).is_file():
                shutil.move(Path(staging) / name, target.parent / name)


def apply_to_bundle(
    bundle: str | Path,
    document: dict,
    source: str | Path,
    on_step: Callable[[str], None] = lambda text: None,
) -> bool:
    """Write the policy into a bundle and rehash it; returns whether the decoder was re-exported."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    layers = manifest.get("model", {}).get("num_layers")
    calibrated = document["calibration"]["model"]["layers"]
    if layers != calibrated:
        raise BundleError(
            f"{bundle} has {layers} layers but calibration ran on a {calibrated}-layer model; "
            "pass the bundle exported from the same source"
        )
    settings = chosen_settings(manifest, document)
    changed = settings != baked_settings(manifest)
    if changed:
        on_step("re-exporting the decoder with the calibrated head and window")
        reexport_decoder(source, bundle, manifest, settings)
    guards = settings_record(settings, layers)
    if settings.oh:
        guards["oh"]["threshold"] = document["policy"]["oh_threshold"]
    manifest["guards"] = guards
    manifest["calibration"] = {
        "policy_file": POLICY_FILE,
        "data_sha256": document["calibration"]["data"]["sha256"],
        "decoder_reexported": changed,
    }
    write_policy(bundle / POLICY_FILE, document)
    on_step("rehashing guard_config.json")
    kept = {k: v for k, v in manifest.items() if k not in ("format_version", "files")}
    write_manifest(bundle, kept)
    return changed
