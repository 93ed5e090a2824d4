"""Model families: one declarative spec per family, a registry keyed by `config.model_type`."""

from __future__ import annotations

from dataclasses import dataclass

from vlmguard.errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilySpec:
    """What the shared exporter needs to know about one vision-language family."""

    name: str
    model_class: str  # transformers class that loads the checkpoint
    vision_model_types: tuple[str, ...]
    text_model_types: tuple[str, ...]
    vision_tower: str  # attribute path to the vision tower
    projector: str  # attribute path to the multimodal projector
    language_model: str  # attribute path to the decoder stack (.layers, .norm, .rotary_emb)
    embed_tokens: str  # attribute path to the token embedding
    lm_head: str  # attribute path to the output projection
    image_token_field: str  # config field holding the image placeholder token id
    image_token: str = "<image>"

    def resolve(self, model: object, path: str) -> object:
        """Follow a dotted attribute path from the loaded model."""
        for part in path.split("."):
            model = getattr(model, part)
        return model

    def num_image_tokens(self, config: object) -> int:
        """How many `<image>` rows one image expands to (the vision encoder's output length)."""
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        strategy = config.vision_feature_select_strategy
        has_cls = vision.model_type == "clip_vision_model"
        return patches + (1 if has_cls and strategy == "full" else 0)


LLAVA = FamilySpec(
    name="llava",
    model_class="LlavaForConditionalGeneration",
    vision_model_types=("clip_vision_model", "siglip_vision_model"),
    text_model_types=("llama", "mistral", "qwen2"),
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    language_model="model.language_model",
    embed_tokens="model.language_model.embed_tokens",
    lm_head="lm_head",
    image_token_field="image_token_id",
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (LLAVA,)}


def supported_summary() -> str:
    """One line naming every supported family and its towers, for error messages."""
    return "; ".join(
        f"{s.name} (vision: {', '.join(s.vision_model_types)}; "
        f"text: {', '.join(s.text_model_types)})"
        for s in FAMILIES.values()
    )


def family_for(config: object) -> FamilySpec:
    """Pick the spec for a loaded config, or say which families are supported."""
    model_type = getattr(config, "model_type", None)
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {supported_summary()}"
        )
    vision_type = config.vision_config.model_type
    text_type = config.text_config.model_type
    if vision_type not in spec.vision_model_types or text_type not in spec.text_model_types:
        raise UnsupportedModelError(
            f"{spec.name} with vision tower {vision_type!r} and language model {text_type!r} "
            f"is not supported; supported: {supported_summary()}"
        )
    return spec
