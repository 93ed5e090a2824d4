"""The bundle's guard_config.json: format version, typed sections, file inventory and digests.

Shared by both halves: the exporter and calibration write it, the runtime reads and checks it.
`read_manifest` gives the version-checked JSON document (what the integrity check walks);
`Manifest.read` the typed form the exporter, calibration and runtime work with. Lean on
purpose (standard library only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import BundleError
from .guards import GuardSettings, TensorSpec, settings_from_record

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


@dataclass(frozen=True)
class ImageLayout:
    """How one image sits in the prompt: its placeholder token and how many rows it becomes."""

    token: str
    token_id: int
    tokens_per_image: int
    image_size: int | None = None


@dataclass(frozen=True)
class ModelRecord:
    """The model facts the runtime needs without transformers (written by the export family)."""

    family: str
    vision_model_type: str
    text_model_type: str
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    image: ImageLayout
    sliding_window: int | None = None
    position_scheme: str = "1d"

    @classmethod
    def from_json(cls, data: dict) -> ModelRecord:
        """Read the `model` section."""
        return cls(**{**data, "image": ImageLayout(**data["image"])})


@dataclass(frozen=True)
class GraphRecord:
    """One graph of the bundle: its file and its inputs and outputs (names, axes, dtypes)."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, list[int]] = field(default_factory=dict)  # a family's own TensorRT ranges

    def input(self, name: str) -> TensorSpec | None:
        """The input called `name`, if the graph has one."""
        return next((spec for spec in self.inputs if spec.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output called `name`, if the graph has one."""
        return next((spec for spec in self.outputs if spec.name == name), None)

    def to_json(self) -> dict:
        """The JSON form."""
        record = {
            "file": self.file,
            "inputs": [spec.record() for spec in self.inputs],
            "outputs": [spec.record() for spec in self.outputs],
        }
        return record | ({"axes": self.axes} if self.axes else {})

    @classmethod
    def from_json(cls, data: dict) -> GraphRecord:
        """Read one entry of the `graphs` section."""
        return cls(
            data["file"],
            tuple(TensorSpec.from_record(spec) for spec in data["inputs"]),
            tuple(TensorSpec.from_record(spec) for spec in data["outputs"]),
            dict(data.get("axes", {})),
        )


@dataclass(frozen=True)
class Manifest:
    """guard_config.json, typed: written by the exporter and calibration, read by the runtime.

    `guards` is the guard section as `vlmguard/guards.py` records it; `detector` the detector's
    own record; keys this version does not know are kept in `extra` and written back as they are.
    """

    model: ModelRecord
    special_tokens: dict
    graphs: dict[str, GraphRecord]
    guards: dict
    dtype: str = "float32"
    source: str | None = None
    source_identity: dict | None = None  # digests of the source checkpoint's files
    vlmguard_version: str | None = None
    created_unix: int | None = None
    detector: dict | None = None
    calibration: dict | None = None
    files: dict[str, dict] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def defenses(self) -> set[str]:
        """The in-model guards the decoder carries."""
        return set(self.guards.get("defenses", []))

    @property
    def settings(self) -> GuardSettings:
        """The decoder's static guard settings."""
        return settings_from_record(self.guards)

    def to_json(self) -> dict:
        """The JSON document, in guard_config.json's key order."""
        doc = {
            "format_version": self.format_version,
            "vlmguard_version": self.vlmguard_version,
            "created_unix": self.created_unix,
            "source": self.source,
            "source_identity": self.source_identity,
            "dtype": self.dtype,
            "model": asdict(self.model),
            "special_tokens": self.special_tokens,
            "graphs": {role: graph.to_json() for role, graph in self.graphs.items()},
            "guards": self.guards,
        }
        for name in ("detector", "calibration"):
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        return doc | self.extra | ({"files": self.files} if self.files else {})

    @classmethod
    def from_json(cls, doc: dict, where: object = MANIFEST_NAME) -> Manifest:
        """Read a guard_config.json document, refusing one without the sections a bundle has."""
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            return cls(
                **{key: doc[key] for key in known if key in doc and key not in _TYPED},
                model=ModelRecord.from_json(doc["model"]),
                graphs={role: GraphRecord.from_json(g) for role, g in doc["graphs"].items()},
                extra={key: value for key, value in doc.items() if key not in known},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise BundleError(
                f"{where} lacks or garbles a section a bundle needs ({err!r}); re-export the bundle"
            ) from None

    @classmethod
    def read(cls, bundle: Path) -> Manifest:
        """Read and type a bundle's guard_config.json."""
        return cls.from_json(read_manifest(bundle), Path(bundle) / MANIFEST_NAME)


_TYPED = ("model", "graphs")  # sections read by their own classes
