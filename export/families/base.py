"""The export side of a model family: how to take a transformers model apart into bundle graphs.

A family is a small declarative class in the style of optimum's `OnnxConfig`: class attributes
name the model's parts, and hooks say what differs between families (the vision graph's inputs
and forward, how many image rows an image becomes, the position scheme, per-layer attention
rules). The shared exporter (`export/exporter.py`, `export/graphs.py`) and the guarded decoder
(`export/guards/decoder.py`) only talk to a family through this interface; the runtime side of
the same family lives in `runtime/families/`, keyed by the same `name`, which guard_config.json
records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers.masking_utils import causal_mask_function, sliding_window_overlay

from vlmguard.errors import UnsupportedModelError
from vlmguard.guards import TensorSpec
from vlmguard.manifest import ImageLayout, ModelRecord

MaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mask(window: int | None) -> MaskFunction:
    """Causal visibility, within a sliding window when given (transformers' mask functions)."""
    if window is None:
        return causal_mask_function
    overlay = sliding_window_overlay(window)

    def windowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return causal_mask_function(b, h, q, k) & overlay(b, h, q, k)

    return windowed


class FamilySpec:
    """What the shared exporter needs to know about one vision-language family."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this family exports
    model_class: ClassVar[str]  # transformers class that loads the checkpoint
    vision_model_types: ClassVar[tuple[str, ...]]
    text_model_types: ClassVar[tuple[str, ...]]
    vision_tower: ClassVar[str]  # attribute path to the vision tower
    projector: ClassVar[str]  # attribute path to the multimodal projector
    language_model: ClassVar[str]  # attribute path to the decoder stack (.layers, .norm, ...)
    embed_tokens: ClassVar[str]  # attribute path to the token embedding
    lm_head: ClassVar[str]  # attribute path to the output projection
    image_token_field: ClassVar[str]  # config field holding the image placeholder token id
    image_token: ClassVar[str] = "<image>"
    position_scheme: ClassVar[str] = "1d"  # position ids = cumsum(attention_mask) - 1
    rope_sequence_axis: ClassVar[int] = 1  # the sequence axis of the rotary cos/sin tensors

    # ------------------------------------------------------------------ parts

    def resolve(self, model: object, path: str) -> object:
        """Follow a dotted attribute path from the loaded model."""
        for part in path.split("."):
            model = getattr(model, part)
        return model

    def check(self, config: object) -> None:
        """Refuse a checkpoint whose towers this family does not export."""
        vision_type = config.vision_config.model_type
        text_type = config.text_config.model_type
        if vision_type not in self.vision_model_types or text_type not in self.text_model_types:
            raise UnsupportedModelError(
                f"{self.name} with vision tower {vision_type!r} and language model "
                f"{text_type!r} is not supported; supported: {self.summary()}"
            )

    def summary(self) -> str:
        """One line naming the family and its towers, for error messages."""
        return (
            f"{self.name} (vision: {', '.join(self.vision_model_types)}; "
            f"text: {', '.join(self.text_model_types)})"
        )

    # ------------------------------------------------------------------ vision graph

    def vision_inputs(self, config: object) -> list[TensorSpec]:
        """The vision graph's inputs; by default fixed-size `pixel_values` [N, 3, S, S]."""
        size = config.vision_config.image_size
        return [TensorSpec("pixel_values", ("num_images", 3, size, size), "float32")]

    def vision_example(self, config: object, images: int) -> list[torch.Tensor]:
        """Tracing inputs for the vision graph."""
        size = config.vision_config.image_size
        return [torch.randn(images, 3, size, size)]

    def vision_features(self, model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """The vision graph's forward: inputs -> projected features [N, rows, hidden]."""
        raise NotImplementedError

    def num_image_tokens(self, config: object) -> int:
        """How many image rows one image becomes in the prompt (the vision output length)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ language model

    def position_embeddings(
        self, rotary: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) for these positions; M-RoPE families take 3-row position ids."""
        return rotary(inputs_embeds, position_ids)

    def layer_windows(self, text_config: object) -> list[int | None]:
        """Each layer's sliding window, or None for full attention."""
        window = getattr(text_config, "sliding_window", None)
        layer_types = getattr(text_config, "layer_types", None)
        layers = text_config.num_hidden_layers
        if layer_types is not None:
            return [window if kind == "sliding_attention" else None for kind in layer_types]
        return [window] * layers

    def mask_function(self, window: int | None) -> MaskFunction:
        """A layer's key visibility rule; override for bidirectional image blocks and the like."""
        return causal_mask(window)

    def model_record(self, config: object) -> ModelRecord:
        """Shapes and token layout the runtime needs without loading transformers."""
        text = config.text_config
        heads = text.num_attention_heads
        return ModelRecord(
            family=self.name,
            position_scheme=self.position_scheme,
            vision_model_type=config.vision_config.model_type,
            text_model_type=text.model_type,
            num_layers=text.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            sliding_window=getattr(text, "sliding_window", None),
            image=ImageLayout(
                token=self.image_token,
                token_id=getattr(config, self.image_token_field),
                tokens_per_image=self.num_image_tokens(config),
                image_size=config.vision_config.image_size,
            ),
        )
