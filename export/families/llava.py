"""LLaVA (llava-hf): a CLIP or SigLIP tower, a projector, a Llama, Mistral or Qwen2 decoder."""

from __future__ import annotations

import torch
from torch import nn

from .base import FamilySpec


class LlavaFamily(FamilySpec):
    """`LlavaForConditionalGeneration`: one fixed-size image, its patch rows after the projector."""

    name = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    vision_model_types = ("clip_vision_model", "siglip_vision_model")
    text_model_types = ("llama", "mistral", "qwen2")
    vision_tower = "model.vision_tower"
    projector = "model.multi_modal_projector"
    language_model = "model.language_model"
    embed_tokens = "model.language_model.embed_tokens"
    lm_head = "lm_head"
    image_token_field = "image_token_id"

    def vision_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Project the chosen hidden layer, dropping CLS under the 'default' strategy."""
        tower = self.resolve(model, self.vision_tower)
        states = tower(pixel_values, output_hidden_states=True).hidden_states
        selected = states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return self.resolve(model, self.projector)(selected)

    def num_image_tokens(self, config: object) -> int:
        """Patches, plus CLIP's CLS row under the 'full' strategy."""
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        strategy = config.vision_feature_select_strategy
        has_cls = vision.model_type == "clip_vision_model"
        return patches + (1 if has_cls and strategy == "full" else 0)


LLAVA = LlavaFamily()
