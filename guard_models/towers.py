"""Per-family facts for detector checkpoints (CLIP, SigLIP): loading, image, patch, text embeds.

Each family is one small class saying how to get the pooled image embedding, the patch
embeddings and the text embeddings of a checkpoint; `TOWERS` maps `config.model_type` to
it. Adding a family is adding a class here. Offline half: imports torch and transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlmguard.errors import VlmguardError

__all__ = [
    "CheckpointNotFoundError",
    "UnsupportedCheckpointError",
    "Tower",
    "ClipTower",
    "SiglipTower",
    "TOWERS",
    "load_tower",
]


class CheckpointNotFoundError(VlmguardError, FileNotFoundError):
    """A detector checkpoint is neither a local directory nor in the Hugging Face cache."""


class UnsupportedCheckpointError(VlmguardError, ValueError):
    """A checkpoint's model_type is not a CLIP or SigLIP dual encoder."""


class Tower(nn.Module):
    """A dual-encoder checkpoint seen as: pixels -> (image embedding, patch embeddings)."""

    model_type: ClassVar[str]

    def __init__(self, model: nn.Module, tokenizer: Any, processor_config: dict) -> None:
        """Wrap a loaded model with its tokenizer and image-processor config."""
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor_config = processor_config

    @property
    def logit_scale(self) -> float:
        """The checkpoint's learned logit scale, exp(logit_scale)."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches along height and width for the processor's crop/size."""
        config = self.model.config.vision_config
        side = config.image_size // config.patch_size
        return side, side

    def image_size(self) -> int:
        """The square input side the vision tower expects."""
        return int(self.model.config.vision_config.image_size)

    def text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise texts the way this family was trained."""
        return dict(self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings [N, D] (projected, not normalised)."""
        return self.model.get_text_features(**self.text_inputs(texts)).pooler_output

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the image embedding [B, D] and patch embeddings [B, P, D]."""
        raise NotImplementedError


class ClipTower(Tower):
    """CLIP: CLS token and patch tokens through post_layernorm and visual_projection."""

    model_type = "clip"

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled CLS embedding and MaskCLIP-style patch embeddings."""
        vision = self.model.vision_model
        hidden = vision(pixel_values=pixel_values).last_hidden_state
        tokens = self.model.visual_projection(vision.post_layernorm(hidden))
        return tokens[:, 0], tokens[:, 1:]


class SiglipTower(Tower):
    """SigLIP: attention-pooling head for the image; each patch through the head alone."""

    model_type = "siglip"

    def text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """SigLIP was trained on max-length padding with no attention mask."""
        length = self.model.config.text_config.max_position_embeddings
        encoded = self.tokenizer(
            texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"]}

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding and per-patch embeddings (the head applied to one token at a time)."""
        vision = self.model.vision_model
        hidden = vision(pixel_values=pixel_values).last_hidden_state  # post-layernorm already
        head = vision.head
        image = head(hidden)
        # Attention pooling over a single token returns its value projection; then the MLP.
        dim = hidden.shape[-1]
        attention = head.attention
        values = hidden @ attention.in_proj_weight[2 * dim :].T + attention.in_proj_bias[2 * dim :]
        patches = attention.out_proj(values)
        patches = patches + head.mlp(head.layernorm(patches))
        return image, patches


TOWERS: dict[str, type[Tower]] = {cls.model_type: cls for cls in (ClipTower, SiglipTower)}


def _resolve(source: str) -> Path:
    """Find a checkpoint directory: a local path or a Hugging Face cache snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(f"{path} has no config.json; point at a checkpoint.")
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; pass a checkpoint directory.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise CheckpointNotFoundError(
            f"detector checkpoint '{source}' is not a directory and not in the Hugging Face "
            "cache; download it first (hf download MODEL_ID) or pass a local path."
        ) from None


def _processor_config(path: Path) -> dict:
    """Read preprocessor_config.json, or fail saying which file is missing."""
    config_path = path / "preprocessor_config.json"
    if not config_path.is_file():
        raise CheckpointNotFoundError(
            f"{path} has no preprocessor_config.json; save the image processor with the model."
        )
    return json.loads(config_path.read_text())


def load_tower(source: str) -> Tower:
    """Load a CLIP or SigLIP checkpoint (directory or cached hub id) as a Tower."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = _resolve(source)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in TOWERS:
        raise UnsupportedCheckpointError(
            f"{source} is a '{model_type}' checkpoint; the detector takes "
            f"{' or '.join(sorted(TOWERS))} dual encoders."
        )
    processor_config = _processor_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001
        raise CheckpointNotFoundError(
            f"{path}: cannot load the tokenizer ({type(error).__name__}); "
            "save the tokenizer files with the model."
        ) from None
    model = AutoModel.from_pretrained(path, attn_implementation="eager").float().eval()
    tower = TOWERS[model_type](model, tokenizer, processor_config)
    crop = processor_config.get("crop_size") or processor_config.get("size") or {}
    side = crop.get("height") if isinstance(crop, dict) else crop
    if side is not None and not math.isclose(side, tower.image_size()):
        raise UnsupportedCheckpointError(
            f"{source}: the image processor makes {side}px images but the vision tower "
            f"expects {tower.image_size()}px; fix preprocessor_config.json."
        )
    return tower
