"""Bundle integrity: check every file against guard_config.json before any graph runs.

What `verify_bundle` checks, in order (the first problem raises a one-line BundleError naming
the file):

1. guard_config.json's `files` inventory is well formed: relative paths inside the bundle, a
   size and a SHA-256 each; every graph the manifest names (decoder, encoders, detector) is
   listed in it.
2. Nothing in the bundle is a link leading outside it, and no file is there that the inventory
   does not list (guard_config.json itself aside): the runtime finds some files by name
   (policy.json, chat_template.jinja, ONNX external data), so an unlisted file is refused
   rather than read.
3. Every listed file is a regular file of the listed size and, in the default `sha256` mode,
   has the listed SHA-256. The `size` mode skips the hashing: it catches missing and
   truncated files but not a same-size change.
4. Every ONNX graph's external-data `location` is a plain relative path (no absolute path, no
   `..`) that resolves inside the bundle to a listed file.

guard_config.json is the root of trust: it is not signed, so pin its SHA-256 (printed by
`vlmguard verify`) where a bundle must be exactly the one you exported. The check runs at load;
a process that can rewrite the bundle while it loads is outside what this guards against.

Standard library only, like manifest.py: no onnx package, no numpy. External-data locations
are read with a small protobuf wire-format reader that walks only the ONNX fields that can hold
tensors.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, UsageError
from .manifest import MANIFEST_NAME, read_manifest, sha256_file

MODES = ("sha256", "size")
DEFAULT_MODE = "sha256"
_FIX = "re-copy the bundle or re-export it"


@dataclass(frozen=True)
class VerifyResult:
    """What a successful check covered."""

    mode: str
    files: int  # listed files checked
    bytes: int  # their total size
    graphs: int  # ONNX graphs whose external data was checked
    seconds: float


def verify_bundle(
    bundle: str | Path, integrity: str = DEFAULT_MODE, manifest: dict | None = None
) -> VerifyResult:
    """Check a bundle's files against its guard_config.json; BundleError on the first fault."""
    if integrity not in MODES:
        raise UsageError(f"integrity must be one of {', '.join(MODES)}, not {integrity!r}")
    started = time.perf_counter()
    bundle = Path(bundle)
    if manifest is None:
        manifest = read_manifest(bundle)
    try:
        root = bundle.resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise BundleError(f"{bundle} cannot be opened ({err})") from err
    files = _inventory(bundle, manifest)
    graphs = _graph_files(bundle, manifest, files)
    _scan_tree(bundle, root, files)
    total = 0
    for name, record in files.items():
        path = _inside(bundle, root, name)
        info = _stat(path, name)
        if info.st_size != record["size"]:
            raise BundleError(
                f"{path} is {info.st_size} bytes but guard_config.json lists "
                f"{record['size']}: the file is truncated or changed; {_FIX}"
            )
        total += info.st_size
        is_graph = name in graphs
        if integrity == "sha256" or is_graph:
            data = _read(path) if is_graph else None
            if integrity == "sha256":
                digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256(path)
                if digest != record["sha256"]:
                    raise BundleError(
                        f"{path} does not match its SHA-256 in guard_config.json: the file "
                        f"was changed or corrupted; {_FIX}"
                    )
            if data is not None:
                _check_external_data(bundle, root, name, data, files)
    return VerifyResult(integrity, len(files), total, len(graphs), time.perf_counter() - started)


# ------------------------------------------------------------------ the inventory


def _inventory(bundle: Path, manifest: dict) -> dict[str, dict]:
    """The manifest's `files` entries, each checked for a safe name, a size and a digest."""
    files = manifest.get("files")
    where = f"{bundle / MANIFEST_NAME}"
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where} has no `files` inventory to check the bundle against; {_FIX}")
    for name, record in files.items():
        _check_name(where, name)
        size = record.get("size") if isinstance(record, dict) else None
        digest = record.get("sha256") if isinstance(record, dict) else None
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
            or not isinstance(digest, str)
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise BundleError(
                f"{where} lists {name!r} without a valid size and SHA-256; re-export the bundle"
            )
    return files


def _check_name(where: str, name: object) -> None:
    """Refuse an inventory or graph name that is not a plain relative path inside the bundle."""
    if (
        not isinstance(name, str)
        or not _plain_relative(name)
        or name == MANIFEST_NAME
        or len(name) > 4096
    ):
        raise BundleError(
            f"{where} lists the file {name!r}, which is not a relative path inside the "
            "bundle; re-export the bundle"
        )


def _plain_relative(name: str) -> bool:
    """Whether a path is relative, '/'-separated, and free of '..', '.', '' and odd characters."""
    if not name or "\\" in name or ":" in name.split("/", 1)[0]:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):  # NUL, newlines, escapes
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from JSON: no file can have that name
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _graph_files(bundle: Path, manifest: dict, files: dict[str, dict]) -> set[str]:
    """Every ONNX file the runtime may open: listed *.onnx files and the graphs named."""
    where = f"{bundle / MANIFEST_NAME}"
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise BundleError(f"{where} names no graphs; {_FIX}")
    named = []
    for role, record in graphs.items():
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            raise BundleError(f"{where}: graph {role!r} has no file name; re-export the bundle")
        named.append(record["file"])
    if "detector" in manifest:
        detector = manifest["detector"]
        variants = detector.get("files") if isinstance(detector, dict) else None
        if not isinstance(variants, dict) or not all(isinstance(v, str) for v in variants.values()):
            raise BundleError(f"{where}: the detector entry lists no graph files; {_FIX}")
        named.extend(variants.values())
    for name in named:
        _check_name(where, name)
        if name not in files:
            raise BundleError(
                f"{where} names the graph {name} but its `files` inventory does not list it, "
                f"so it cannot be checked; {_FIX}"
            )
    return {name for name in files if name.lower().endswith(".onnx")} | set(named)


# ------------------------------------------------------------------ the files on disk


def _scan_tree(bundle: Path, root: Path, files: dict[str, dict]) -> None:
    """Refuse links out of the bundle and files the inventory does not list."""
    for here, dirs, names in os.walk(bundle, onerror=_raise_walk_error):
        base = Path(here)
        for name in dirs + names:
            path = base / name
            relative = path.relative_to(bundle).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    raise BundleError(
                        f"{_show(path)} is a link leading outside the bundle (to "
                        f"{_show(target)}); replace it with the file itself (cp -rL) or "
                        "re-export the bundle"
                    )
            if name in names and relative != MANIFEST_NAME and relative not in files:
                raise BundleError(
                    f"{_show(path)} is not listed in guard_config.json and the runtime refuses "
                    "unlisted files; remove it, or re-export the bundle to include it"
                )


def _show(path: Path) -> str:
    """A path for a one-line message: as is, or quoted when it holds control characters."""
    text = str(path)
    return repr(text) if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) else text


def _raise_walk_error(err: OSError) -> None:
    """os.walk's error hook: an unreadable folder fails the check instead of being skipped."""
    raise BundleError(f"{err.filename} cannot be read ({err.strerror}); {_FIX}")


def _inside(bundle: Path, root: Path, name: str) -> Path:
    """The path of a listed file, refused when any link on the way leads outside the bundle."""
    path = bundle / name
    try:
        target = path.resolve()
    except (OSError, RuntimeError, ValueError) as err:
        raise BundleError(f"{path} cannot be resolved ({err}); {_FIX}") from err
    if not target.is_relative_to(root):
        raise BundleError(
            f"{path} leads outside the bundle (to {target}); replace the link with the file "
            "itself (cp -rL) or re-export the bundle"
        )
    return path


def _stat(path: Path, name: str) -> os.stat_result:
    """Stat a listed file, refusing a missing one or anything but a regular file."""
    try:
        info = path.stat()
    except FileNotFoundError as err:
        raise BundleError(f"{path} is missing (guard_config.json lists {name}); {_FIX}") from err
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} cannot be read ({err}); {_FIX}") from err
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{path} is not a regular file; {_FIX}")
    return info


def _read(path: Path) -> bytes:
    """A whole (graph) file's bytes."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise BundleError(f"{path} cannot be read ({err}); {_FIX}") from err


def _sha256(path: Path) -> str:
    """The manifest's SHA-256 of a file, with a one-line BundleError if it cannot be read."""
    try:
        return sha256_file(path)
    except OSError as err:
        raise BundleError(f"{path} cannot be read ({err}); {_FIX}") from err


# ------------------------------------------------------------------ ONNX external data


def _check_external_data(
    bundle: Path, root: Path, name: str, data: bytes, files: dict[str, dict]
) -> None:
    """Refuse a graph whose external data lives outside the bundle or in an unlisted file."""
    path = bundle / name
    try:
        locations = external_data_locations(data)
    except ValueError as err:
        raise BundleError(f"{path} is not a readable ONNX graph ({err}); {_FIX}") from err
    folder = Path(name).parent
    for location in sorted(locations):
        if not _plain_relative(location) or location.startswith("/"):
            raise BundleError(
                f"{path} reads external data from {location!r}, which is not a plain relative "
                "path inside the bundle (absolute paths and '..' are refused); re-export the "
                "bundle"
            )
        listed = (folder / location).as_posix()
        _inside(bundle, root, listed)
        if listed not in files:
            raise BundleError(
                f"{path} reads external data from {location!r}, which guard_config.json does "
                f"not list; {_FIX}"
            )


# Which length-delimited fields to descend into, per ONNX message (onnx.proto field numbers).
_MODEL, _TRAINING, _FUNCTION, _GRAPH, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
}
_EXTERNAL_DATA = 13  # TensorProto.external_data: repeated StringStringEntryProto {1: key, 2: value}
_MAX_DEPTH = 100  # nested subgraphs; protobuf's own default recursion limit


def external_data_locations(model: bytes) -> set[str]:
    """Every external-data `location` in a serialized ONNX ModelProto (ValueError if malformed)."""
    found: set[str] = set()
    _walk(memoryview(model), _MODEL, found, 0)
    return found


def _walk(buf: memoryview, kind: int, found: set[str], depth: int) -> None:
    """Descend one message, collecting tensor external-data locations."""
    if depth > _MAX_DEPTH:
        raise ValueError("subgraphs nested too deeply")
    if kind == _TENSOR:
        for _, value in _fields(buf, {_EXTERNAL_DATA}):
            entry = dict(_fields(value, {1, 2}))
            if bytes(entry.get(1, b"")) == b"location":
                try:
                    found.add(bytes(entry.get(2, b"")).decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise ValueError("an external-data location is not UTF-8") from err
        return
    children = _CHILDREN[kind]
    for field, value in _fields(buf, children.keys()):
        _walk(value, children[field], found, depth + 1)


def _fields(buf: memoryview, wanted: Container[int]) -> list[tuple[int, memoryview]]:
    """The wanted length-delimited fields of one protobuf message as (number, bytes)."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]
        pos += 1
        if key >= 0x80:
            key, pos = _varint(buf, pos - 1)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            if key >> 3 in wanted:
                out.append((key >> 3, buf[pos : pos + length]))
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
    return out


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at pos; return (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
