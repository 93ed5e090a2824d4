"""Samples -> the runtime's token ids, guard rows and pixels, merged into embeddings by torch.

Calibration lays a prompt out exactly as the runtime does, with the runtime's own code:
`PromptBuilder` (a bundle's tokenizer.json, tokenizer_config.json, chat_template.jinja and the
manifest's image and special-token facts) gives the ids with the image token expanded by the
runtime family's rule and the image, instruction and safety-prefix rows, tokenizing the user's
text as text; and the runtime family's `preprocess` (the bundle's preprocessor_config.json) gives
the pixel values, with the EXIF orientation applied and transparency composited as the runtime
does. Torch only runs the
model: the embedding lookup, the vision graph's module on those pixels, then the decoder.

With a bundle, its files are used. Without one, the exporter's own functions write the files it
would put in a bundle into a temporary directory, and the builder is read from there, so there
is one prompt layout: the runtime's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmguard.errors import BundleError
from vlmguard.export.families import FamilySpec, family_for
from vlmguard.export.graphs import VisionEncoder
from vlmguard.export.source import LoadedSource, copy_processing_files
from vlmguard.manifest import Manifest
from vlmguard.runtime.families import RuntimeFamily, runtime_family
from vlmguard.runtime.image_preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageFileNotFoundError,
    ImageInputError,
)
from vlmguard.runtime.prompting import EncodedPrompt, PromptBuilder, PromptError

from .data import Sample
from .errors import SampleError


@dataclass
class Encoded:
    """One sample's prompt: token ids, merged embeddings and its guard rows (bool masks)."""

    input_ids: torch.Tensor  # [S]
    embeds: torch.Tensor  # [S, D]
    image_rows: torch.Tensor  # [S] bool
    instruction_rows: torch.Tensor  # [S] bool
    prefix_rows: torch.Tensor  # [S] bool
    pad_id: int = 0  # the runtime's pad token, and its embedding (None: zeros)
    pad_embed: torch.Tensor | None = None  # [D]


@dataclass
class Batch:
    """A left-padded batch of encoded prompts, ready for the guarded decoder."""

    embeds: torch.Tensor  # [B, S, D]
    attention_mask: torch.Tensor  # [B, S] int64
    image_rows: torch.Tensor  # [B, S] int64
    instruction_rows: torch.Tensor  # [B, S] int64
    prefix_rows: torch.Tensor  # [B, S] int64
    input_ids: torch.Tensor  # [B, S] int64, padded with the runtime's pad token

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions as the runtime (and transformers' generate) derives them from the mask."""
        positions = self.attention_mask.cumsum(-1) - 1
        return positions.masked_fill(self.attention_mask == 0, 1)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on another device."""
        return Batch(*(t.to(device) for t in (
            self.embeds, self.attention_mask, self.image_rows, self.instruction_rows,
            self.prefix_rows, self.input_ids,
        )))  # fmt: skip

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return self.embeds.shape[0]


@dataclass(frozen=True)
class RuntimeInputs:
    """What the runtime reads from a bundle to lay a request out: its prompt builder and family."""

    prompts: PromptBuilder
    family: RuntimeFamily
    where: str  # the bundle, or what the files were made from, for messages
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # GuardedVLM's default limit

    @classmethod
    def from_bundle(cls, bundle: str | Path, manifest: Manifest | None = None) -> RuntimeInputs:
        """The prompt builder and runtime family a GuardedVLM on `bundle` would use."""
        bundle = Path(bundle)
        manifest = Manifest.read(bundle) if manifest is None else manifest
        family = runtime_family(bundle, manifest)
        prompts = PromptBuilder.from_bundle(bundle, manifest.to_json(), family.expand_image)
        return cls(prompts, family, str(bundle))

    @classmethod
    def from_source(cls, loaded: LoadedSource) -> RuntimeInputs:
        """The same, from the files the exporter would write for `loaded` (in a temporary dir)."""
        config = loaded.model.config
        with tempfile.TemporaryDirectory(prefix="vlmguard-calibration-") as directory:
            special_tokens = copy_processing_files(loaded, Path(directory))
            manifest = Manifest(
                model=family_for(config).model_record(config),
                special_tokens=special_tokens,
                graphs={},
                guards={},
            )
            inputs = cls.from_bundle(directory, manifest)
        return cls(inputs.prompts, inputs.family, str(loaded.path))


def _sample_name(sample: Sample) -> str:
    """How an error names a sample: its line in the JSONL and its id, if it has one."""
    name = f"sample on line {sample.line}" if sample.line else "sample"
    return f"{name} (id {sample.id})" if sample.id else name


class PromptEncoder:
    """Encodes samples on the runtime's input path; the source model only runs the forward."""

    def __init__(self, spec: FamilySpec, model: torch.nn.Module, inputs: RuntimeInputs) -> None:
        self.spec = spec
        self.model = model
        self.inputs = inputs
        self.prompts = inputs.prompts
        self.embed = spec.resolve(model, spec.embed_tokens)
        self.vision = VisionEncoder(spec, model)
        image = asdict(spec.model_record(model.config).image)
        laid_out = {"token_id": self.prompts.image_token_id}
        laid_out["tokens_per_image"] = self.prompts.tokens_per_image
        if any(image[key] != value for key, value in laid_out.items()):
            raise BundleError(
                f"{inputs.where} lays an image out as {laid_out}, the model as "
                f"{ {key: image[key] for key in laid_out} }: pass the bundle exported from "
                "this model"
            )
        self.image_token_id = self.prompts.image_token_id
        self.tokens_per_image = self.prompts.tokens_per_image
        pad = torch.tensor([self.prompts.pad_token_id], device=self.embed.weight.device)
        with torch.no_grad():
            self.pad_embed = self.embed(pad)[0].cpu()

    @classmethod
    def for_source(cls, loaded: LoadedSource, bundle: str | Path | None = None) -> PromptEncoder:
        """An encoder with `bundle`'s files, or (None) the files the exporter would write."""
        inputs = RuntimeInputs.from_bundle(bundle) if bundle else RuntimeInputs.from_source(loaded)
        return cls(family_for(loaded.model.config), loaded.model, inputs)

    def pixel_values(self, sample: Sample) -> np.ndarray | None:
        """The (1, 3, H, W) float32 pixels GuardedVLM makes of the sample's image (None: none)."""
        if sample.image is None:
            return None
        try:
            return self.inputs.family.preprocess(sample.image, self.inputs.max_image_pixels)
        except (ImageInputError, ImageFileNotFoundError) as err:
            raise SampleError(f"{_sample_name(sample)}: {err}") from None

    def prompt(self, sample: Sample, safety_prefix: str | None = None) -> EncodedPrompt:
        """The runtime's ids and guard rows of the sample's prompt (with a safety prefix)."""
        try:
            return self.prompts.encode(sample.prompt, sample.image is not None, safety_prefix)
        except PromptError as err:
            raise SampleError(f"{_sample_name(sample)}: {err}") from None

    def features(self, pixels: np.ndarray) -> torch.Tensor:
        """Projected image features [tokens, D]: the vision graph's module on the pixels."""
        weight = self.embed.weight
        with torch.no_grad():
            return self.vision.flat_forward(torch.from_numpy(pixels).to(weight.device))[0]

    def encode_variants(
        self, sample: Sample, safety_prefixes: Sequence[str | None]
    ) -> list[Encoded]:
        """The sample encoded once per safety prefix, its image preprocessed and encoded once."""
        pixels = self.pixel_values(sample)
        features = None if pixels is None else self.features(pixels)
        return [self._merge(self.prompt(sample, p), features) for p in safety_prefixes]

    def encode(self, sample: Sample, safety_prefix: str | None = None) -> Encoded:
        """Token ids, merged embeddings and guard rows of one sample's prompt."""
        return self.encode_variants(sample, [safety_prefix])[0]

    def _merge(self, prompt: EncodedPrompt, features: torch.Tensor | None) -> Encoded:
        """Embed the ids and put the image features in the image rows, as the runtime does."""
        ids = torch.tensor(prompt.input_ids, dtype=torch.int64)

        def rows(indices: list[int]) -> torch.Tensor:
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[torch.tensor(indices, dtype=torch.int64)] = True
            return mask

        image = rows(prompt.image_rows)
        with torch.no_grad():
            embeds = self.embed(ids[None].to(self.embed.weight.device))[0]
            if features is not None:
                embeds[image.to(embeds.device)] = features.to(embeds.dtype)
        return Encoded(
            ids, embeds.cpu(), image, rows(prompt.instruction_rows), rows(prompt.prefix_rows),
            self.prompts.pad_token_id, self.pad_embed,
        )  # fmt: skip


def collate(items: list[Encoded]) -> Batch:
    """Left-pad encoded prompts into one batch, as the runtime's `PromptBuilder.pad_batch`."""
    length = max(item.embeds.shape[0] for item in items)
    first = items[0]
    embeds = torch.zeros(len(items), length, first.embeds.shape[1], dtype=first.embeds.dtype)
    if first.pad_embed is not None:  # the runtime embeds its pad ids; the mask hides them
        embeds[:] = first.pad_embed.to(embeds.dtype)
    input_ids = torch.full((len(items), length), first.pad_id, dtype=torch.int64)
    masks = {k: torch.zeros(len(items), length, dtype=torch.int64) for k in range(4)}
    for row, item in enumerate(items):
        pad = length - item.embeds.shape[0]
        embeds[row, pad:] = item.embeds
        input_ids[row, pad:] = item.input_ids
        masks[0][row, pad:] = 1
        masks[1][row, pad:] = item.image_rows.long()
        masks[2][row, pad:] = item.instruction_rows.long()
        masks[3][row, pad:] = item.prefix_rows.long()
    return Batch(embeds, masks[0], masks[1], masks[2], masks[3], input_ids)


def batches(items: list[Encoded], size: int, device: str = "cpu") -> Iterator[Batch]:
    """Consecutive left-padded batches of at most `size` prompts, on a device."""
    for start in range(0, len(items), size):
        yield collate(items[start : start + size]).to(device)
