"""Tiny random CLIP/SigLIP checkpoints (model, tokenizer, image processor) for tests.

Nothing is downloaded: the model comes from a transformers config with a fixed seed, the
tokenizer is a word-level `tokenizers` model over a given vocabulary, and all three are
written with `save_pretrained` so they load like a real checkpoint. Offline half.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vlmguard.errors import VlmguardError

__all__ = [
    "SPECIAL_TOKENS",
    "UnknownTinyFamilyError",
    "build_tokenizer",
    "words_of",
    "save_tiny_checkpoint",
]

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0..3


class UnknownTinyFamilyError(VlmguardError, ValueError):
    """A tiny checkpoint was asked for in a family other than clip or siglip."""


def words_of(texts: Iterable[str]) -> list[str]:
    """The sorted lower-case word vocabulary of some texts."""
    return sorted({word for text in texts for word in re.findall(r"[a-z0-9]+", text.lower())})


def build_tokenizer(words: Iterable[str], max_length: int) -> Any:
    """A word-level fast tokenizer: lower-case words, <bos> ... <eos>, <pad> = 0."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def _config(family: str, vocab_size: int, image_size: int, patch_size: int, width: int):
    """A small CLIP or SigLIP config."""
    from transformers import CLIPConfig, SiglipConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    vision = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    if family == "clip":
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)
    if family == "siglip":
        text["projection_size"] = width
        return SiglipConfig(text_config=text, vision_config=vision)
    raise UnknownTinyFamilyError(f"unknown family {family!r}; use 'clip' or 'siglip'.")


def save_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "clip",
    words: Iterable[str] = (),
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
) -> Path:
    """Write a random tiny checkpoint loadable with from_pretrained; return its directory."""
    from transformers import AutoModel
    from transformers.models.clip import CLIPImageProcessorPil
    from transformers.models.siglip import SiglipImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(words, max_length=32)
    torch.manual_seed(seed)
    model = AutoModel.from_config(_config(family, len(tokenizer), image_size, patch_size, width))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if family == "clip":
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    else:
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor.save_pretrained(out_dir)
    return out_dir
