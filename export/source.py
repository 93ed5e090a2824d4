"""Find, check and load a source checkpoint; copy the files the runtime needs from it."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from vlmguard.errors import SourceError
from vlmguard.manifest import sha256_file

from .families import family_for

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
REQUIRED_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json")
COPIED_FILES = (
    "config.json",
    "preprocessor_config.json",
    "generation_config.json",
    "processor_config.json",
)


@dataclass
class LoadedSource:
    """A loaded checkpoint: its directory, model, tokenizer and processor."""

    path: Path
    model: torch.nn.Module
    tokenizer: object
    processor: object


def resolve_source(source: str) -> Path:
    """A local checkpoint directory, or a model id already in the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{source} is a file; pass a checkpoint directory or a model id")
    if source.startswith(("/", ".", "~")):
        raise SourceError(f"{source} does not exist; pass a checkpoint directory or a model id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as err:  # not a valid id, or not cached: both mean "not here"
        raise SourceError(
            f"{source!r} is neither a local directory nor a model in the Hugging Face cache; "
            f"download it first (`hf download {source}`) or pass a checkpoint directory"
        ) from err


def check_files(path: Path) -> None:
    """Say which of the files an export needs are missing from a checkpoint directory."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append("model.safetensors (or another weights file)")
    if missing:
        raise SourceError(f"{path} is missing {', '.join(missing)}; is it a complete checkpoint?")


IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # weight files, sharded or not
_IDENTITIES: dict[tuple, dict] = {}  # memo: the same unchanged files are hashed once


def source_identity(path: Path) -> dict:
    """What makes a checkpoint this model: SHA-256 of config.json and of every weight file.

    `sha256` digests the sorted `name:digest` lines of `files` (config.json, the weight files
    and their index files), so two checkpoints are the same model exactly when it matches.
    """
    path = Path(path)
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file()
        and (
            p.name == "config.json"
            or p.suffix in IDENTITY_SUFFIXES
            or p.name.endswith((".safetensors.index.json", ".bin.index.json"))
        )
    )
    stats = tuple((n, (path / n).stat().st_size, (path / n).stat().st_mtime_ns) for n in names)
    key = (str(path.resolve()), stats)
    if key not in _IDENTITIES:
        files = {name: sha256_file(path / name) for name in names}
        lines = "".join(f"{name}:{digest}\n" for name, digest in files.items())
        _IDENTITIES[key] = {
            "sha256": hashlib.sha256(lines.encode()).hexdigest(),
            "files": files,
            "rule": "sha256 over sorted 'name:sha256' lines of config.json and the weight files",
        }
    return {**_IDENTITIES[key], "files": dict(_IDENTITIES[key]["files"])}


def load_source(path: Path) -> LoadedSource:
    """Check, then load model, tokenizer and processor, refusing unsupported families early."""
    check_files(path)
    config = transformers.AutoConfig.from_pretrained(path)
    spec = family_for(config)
    model_class = getattr(transformers, spec.model_class)
    model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", None) or transformers.AutoTokenizer.from_pretrained(
        path
    )
    if not getattr(processor, "chat_template", None):
        raise SourceError(f"{path} has no chat template; add chat_template.jinja and retry")
    return LoadedSource(path, model, tokenizer, processor)


def copy_processing_files(loaded: LoadedSource, bundle: Path) -> dict:
    """Copy processor files, save the tokenizer and chat template; return special token ids.

    The tokenizer is re-saved rather than copied: transformers 5 rebuilds the normalizer and
    pre-tokenizer of legacy Llama tokenizers on load, so the source's tokenizer.json alone
    would tokenize differently from transformers; the saved one matches it.
    """
    for name in COPIED_FILES:
        if (loaded.path / name).is_file():
            shutil.copy2(loaded.path / name, bundle / name)
    tokenizer = loaded.tokenizer
    tokenizer.save_pretrained(bundle)
    (bundle / "chat_template.jinja").write_text(loaded.processor.chat_template)
    generation = {}
    if (loaded.path / "generation_config.json").is_file():
        generation = json.loads((loaded.path / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", tokenizer.eos_token_id)
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos if isinstance(eos, list) else [eos],
        "pad_token_id": tokenizer.pad_token_id,
        "image_token_id": loaded.model.config.image_token_id,
        "padding_side": tokenizer.padding_side,
    }
