"""Samples -> merged input embeddings and guard rows, as the runtime lays a prompt out.

The text is the source processor's chat template with the generation prompt; image features are
scattered into the `<image>` rows (the merged-embedding path of the exported bundle). Rows of
the user's instruction and of a safety prefix are found from the tokenizer's character offsets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from vlmguard.export.families import FamilySpec
from vlmguard.runtime.prompting import token_rows_in_span

from .data import Sample


@dataclass
class Encoded:
    """One sample's prompt: token ids, merged embeddings and its guard rows (bool masks)."""

    input_ids: torch.Tensor  # [S]
    embeds: torch.Tensor  # [S, D]
    image_rows: torch.Tensor  # [S] bool
    instruction_rows: torch.Tensor  # [S] bool
    prefix_rows: torch.Tensor  # [S] bool


@dataclass
class Batch:
    """A left-padded batch of encoded prompts, ready for the guarded decoder."""

    embeds: torch.Tensor  # [B, S, D]
    attention_mask: torch.Tensor  # [B, S] int64
    image_rows: torch.Tensor  # [B, S] int64
    instruction_rows: torch.Tensor  # [B, S] int64
    prefix_rows: torch.Tensor  # [B, S] int64

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions as transformers' generate derives them from the mask."""
        positions = self.attention_mask.cumsum(-1) - 1
        return positions.masked_fill(self.attention_mask == 0, 1)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on another device."""
        return Batch(*(t.to(device) for t in (
            self.embeds, self.attention_mask, self.image_rows, self.instruction_rows,
            self.prefix_rows,
        )))  # fmt: skip

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return self.embeds.shape[0]


def _span_rows(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[bool]:
    """Per token, whether it overlaps a character span (the runtime's rule, as booleans)."""
    inside = set(token_rows_in_span(offsets, span))
    return [i in inside for i in range(len(offsets))]


class PromptEncoder:
    """Encodes samples with a loaded source's processor, tokenizer and model."""

    def __init__(self, spec: FamilySpec, model: torch.nn.Module, processor: object) -> None:
        self.spec = spec
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = getattr(model.config, spec.image_token_field)
        self.tokens_per_image = spec.num_image_tokens(model.config)
        self.embed = spec.resolve(model, spec.embed_tokens)

    def _text(self, user_text: str, with_image: bool) -> str:
        """The chat template applied to one user turn, with the generation prompt."""
        content = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": user_text})
        conversation = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def _features(self, image_path: object) -> torch.Tensor:
        """Projected image features [tokens, D] for one image file."""
        image = Image.open(image_path).convert("RGB")
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            pixel_values = pixels["pixel_values"].to(self.embed.weight.device)
            out = self.model.get_image_features(pixel_values)
        features = getattr(out, "pooler_output", out)
        return torch.cat(list(features)) if isinstance(features, list | tuple) else features[0]

    def encode(self, sample: Sample, safety_prefix: str | None = None) -> Encoded:
        """Token ids, merged embeddings and guard rows of one sample's prompt."""
        prefix = safety_prefix or ""
        if prefix and not prefix[-1].isspace():
            prefix += " "
        user_text = prefix + sample.prompt
        text = self._text(user_text, sample.image is not None)
        start = text.rfind(user_text)
        enc = self.tokenizer(text, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        spans = {
            "prefix": _span_rows(offsets, (start, start + len(prefix.rstrip()))),
            "instruction": _span_rows(offsets, (start + len(prefix), start + len(user_text))),
        }
        ids, image, instruction, in_prefix = [], [], [], []
        for index, token in enumerate(enc["input_ids"]):
            copies = self.tokens_per_image if token == self.image_token_id else 1
            ids += [token] * copies
            image += [token == self.image_token_id] * copies
            instruction += [spans["instruction"][index] and copies == 1] * copies
            in_prefix += [spans["prefix"][index] and copies == 1] * copies
        ids_t = torch.tensor(ids)
        with torch.no_grad():
            embeds = self.embed(ids_t[None].to(self.embed.weight.device))[0].cpu()
            if sample.image is not None:
                embeds[torch.tensor(image)] = self._features(sample.image).cpu().to(embeds.dtype)
        return Encoded(
            ids_t, embeds, torch.tensor(image), torch.tensor(instruction), torch.tensor(in_prefix)
        )


def collate(items: list[Encoded]) -> Batch:
    """Left-pad encoded prompts into one batch."""
    length = max(item.embeds.shape[0] for item in items)
    width = items[0].embeds.shape[1]
    embeds = torch.zeros(len(items), length, width, dtype=items[0].embeds.dtype)
    masks = {k: torch.zeros(len(items), length, dtype=torch.int64) for k in range(4)}
    for row, item in enumerate(items):
        pad = length - item.embeds.shape[0]
        embeds[row, pad:] = item.embeds
        masks[0][row, pad:] = 1
        masks[1][row, pad:] = item.image_rows.long()
        masks[2][row, pad:] = item.instruction_rows.long()
        masks[3][row, pad:] = item.prefix_rows.long()
    return Batch(embeds, masks[0], masks[1], masks[2], masks[3])


def batches(items: list[Encoded], size: int, device: str = "cpu") -> Iterator[Batch]:
    """Consecutive left-padded batches of at most `size` prompts, on a device."""
    for start in range(0, len(items), size):
        yield collate(items[start : start + size]).to(device)
