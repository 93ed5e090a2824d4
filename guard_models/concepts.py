"""The concept bank: unsafe categories, each with several text variants, read from JSON.

A concept file looks like::

    {"categories": [{"name": "violence", "variants": ["a photo of violence", "..."]}, ...]}

Optional keys (`description`, per-category `sources`) are kept for people and ignored by
the detector. Torch-free: the runtime reads category names from the manifest, and the
exporter embeds the variants with the text tower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vlmguard.errors import VlmguardError

__all__ = [
    "Category",
    "ConceptBank",
    "ConceptBankError",
    "ConceptFileNotFoundError",
    "default_concepts_path",
    "load_concept_bank",
    "parse_concept_bank",
]


class ConceptBankError(VlmguardError, ValueError):
    """A concept file is malformed: bad JSON, an empty or duplicate category, a bad variant."""


class ConceptFileNotFoundError(VlmguardError, FileNotFoundError):
    """A concept file path does not exist."""


@dataclass(frozen=True)
class Category:
    """One concept category: a name and the text variants that describe it."""

    name: str
    variants: tuple[str, ...]
    sources: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class ConceptBank:
    """An ordered list of categories; the order fixes the detector's output columns."""

    categories: tuple[Category, ...]

    @property
    def names(self) -> list[str]:
        """Category names in output order."""
        return [category.name for category in self.categories]

    @property
    def max_variants(self) -> int:
        """The largest number of variants in any category (the padded width in the graph)."""
        return max(len(category.variants) for category in self.categories)

    def to_json(self) -> list[dict[str, Any]]:
        """The bank as plain JSON data, for manifests."""
        return [
            {"name": c.name, "variants": list(c.variants), "sources": list(c.sources)}
            for c in self.categories
        ]


def default_concepts_path() -> Path:
    """Path of the packaged default concept bank (ETA's categories and MM-SafetyBench's)."""
    return Path(str(resources.files("vlmguard.guard_models").joinpath("data/concepts.json")))


def _fail(where: str, message: str) -> ConceptBankError:
    """Build a one-line concept-bank error naming the file."""
    return ConceptBankError(f"{where}: {message}")


def _parse_category(item: Any, index: int, where: str) -> Category:
    """Validate one category entry."""
    if not isinstance(item, dict):
        raise _fail(where, f"category #{index + 1} must be an object with 'name' and 'variants'.")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, f"category #{index + 1} needs a non-empty string 'name'.")
    name = name.strip()
    variants = item.get("variants")
    if not isinstance(variants, list) or not variants:
        raise _fail(where, f"category '{name}' is empty; give it a non-empty 'variants' list.")
    cleaned: list[str] = []
    for variant in variants:
        if not isinstance(variant, str) or not variant.strip():
            raise _fail(where, f"category '{name}' has an empty or non-string variant.")
        if variant.strip() in cleaned:
            raise _fail(where, f"category '{name}' repeats the variant '{variant.strip()}'.")
        cleaned.append(variant.strip())
    sources = item.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise _fail(where, f"category '{name}': 'sources' must be a list of strings.")
    return Category(name=name, variants=tuple(cleaned), sources=tuple(sources))


def parse_concept_bank(data: Any, where: str = "concept bank") -> ConceptBank:
    """Validate concept-bank JSON data and return the bank."""
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list) or not categories:
        raise _fail(where, "expected an object with a non-empty 'categories' list.")
    parsed: list[Category] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(categories):
        category = _parse_category(item, index, where)
        key = category.name.casefold()
        if key in seen:
            raise _fail(
                where, f"duplicate category '{category.name}'; merge its variants into one entry."
            )
        seen[key] = category.name
        parsed.append(category)
    return ConceptBank(categories=tuple(parsed))


def load_concept_bank(path: str | Path | None = None) -> ConceptBank:
    """Read and validate a concept file; None means the packaged default bank."""
    path = default_concepts_path() if path is None else Path(path)
    if not path.is_file():
        raise ConceptFileNotFoundError(f"concept file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _fail(
            str(path), f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})."
        ) from None
    except UnicodeDecodeError:
        raise _fail(str(path), "not a UTF-8 text file.") from None
    return parse_concept_bank(data, where=str(path))
