"""Shared test machinery: tiny checkpoints, their bundles, HF references and an ORT decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from PIL import Image

from vlmguard.export.exporter import export_bundle
from vlmguard.export.tiny_model import TEXT_MODELS, VISION_TOWERS, build_tiny_llava
from vlmguard.manifest import read_manifest

COMBOS = [(v, t) for v in VISION_TOWERS for t in TEXT_MODELS]
COMBO_IDS = [f"{v}-{t}" for v, t in COMBOS]
PTR_WINDOW = (1, 3)  # tiny models have 4 layers: one before, two inside, one after
OH_LAYER, OH_HEAD = 2, 1
PROMPTS = [
    "What is in this picture?",
    "Describe the colours and the shapes you can see here, please.",
]


def noise_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A deterministic noisy RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@dataclass
class TinySetup:
    """One vision x text combination: source checkpoint, HF model and its bundles."""

    source: Path
    model: torch.nn.Module
    processor: object
    bundles: dict[str, Path] = field(default_factory=dict)
    _sessions: dict[str, OrtDecoder] = field(default_factory=dict)

    def decoder(self, kind: str) -> OrtDecoder:
        """A cached ORT decoder for the 'plain' or 'guarded' bundle."""
        if kind not in self._sessions:
            self._sessions[kind] = OrtDecoder(self.bundles[kind])
        return self._sessions[kind]


def make_setup(root: Path, vision: str, text: str) -> TinySetup:
    """Build a tiny checkpoint and export its plain and fully guarded bundles."""
    torch.manual_seed(0)
    source = build_tiny_llava(root / "source", vision=vision, text=text, seed=0)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(source).eval()
    model.set_attn_implementation("eager")
    processor = transformers.AutoProcessor.from_pretrained(source)
    setup = TinySetup(source, model, processor)
    setup.bundles["plain"] = export_bundle(source, root / "plain", frozenset())
    setup.bundles["guarded"] = export_bundle(
        source, root / "guarded", ptr_window=PTR_WINDOW, oh_layer=OH_LAYER, oh_head=OH_HEAD
    )
    return setup


@dataclass
class Prompt:
    """A tokenized, left-padded batch with its merged input embeddings."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    inputs_embeds: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions as transformers' generate derives them from the mask."""
        positions = self.attention_mask.cumsum(-1) - 1
        return positions.masked_fill(self.attention_mask == 0, 1)


def make_prompt(setup: TinySetup, batch: int) -> Prompt:
    """Chat-templated prompts with one image each, merged into embeddings by the HF model."""
    texts = []
    for prompt in PROMPTS[:batch]:
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        texts.append(setup.processor.apply_chat_template(conversation, add_generation_prompt=True))
    images = [noise_image(i) for i in range(batch)]
    enc = setup.processor(text=texts, images=images, padding=True, return_tensors="pt")
    model = setup.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(enc["input_ids"])
        features = torch.cat(list(model.get_image_features(enc["pixel_values"]).pooler_output))
        image_rows = (enc["input_ids"] == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image_rows.expand_as(embeds), features)
    return Prompt(enc["input_ids"], enc["attention_mask"], enc["pixel_values"], embeds)


class OrtDecoder:
    """Runs a bundle's decoder graph on the CPU, keeping its own KV cache and guard state."""

    def __init__(self, bundle: Path) -> None:
        self.manifest = read_manifest(bundle)
        record = self.manifest["graphs"]["decoder"]
        self.session = ort.InferenceSession(
            str(bundle / record["file"]), providers=["CPUExecutionProvider"]
        )
        self.inputs = {spec["name"]: spec for spec in record["inputs"]}
        self.outputs = [spec["name"] for spec in record["outputs"]]
        self.num_layers = self.manifest["model"]["num_layers"]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past KV (and pruned mask) for a prefill."""
        feeds = {}
        for name, spec in self.inputs.items():
            if name.startswith("past_key_values."):
                _, heads, _, dim = spec["shape"]
                feeds[name] = np.zeros((batch, heads, 0, dim), spec["dtype"])
        if "ptr_past_pruned_mask" in self.inputs:
            feeds["ptr_past_pruned_mask"] = np.zeros((batch, 0), np.int64)
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one step; returns every output by name."""
        values = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})
        return dict(zip(self.outputs, values, strict=True))

    def next_past(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Turn a step's presents (and pruned mask) into the next step's past inputs."""
        feeds = {
            f"past_key_values.{name[len('present.') :]}": value
            for name, value in outputs.items()
            if name.startswith("present.")
        }
        if "ptr_pruned_mask" in outputs:
            feeds["ptr_past_pruned_mask"] = outputs["ptr_pruned_mask"]
        return feeds


def neutral_guards(
    decoder: OrtDecoder, batch: int, seq: int, total: int, prefill: bool
) -> dict[str, np.ndarray]:
    """Guard inputs that leave the model's computation unchanged."""
    feeds = {
        "guard_positions": np.arange(seq if prefill else 0, dtype=np.int64),
        "align_gamma": np.zeros(decoder.num_layers, np.float32),
        "align_prefix_mask": np.zeros((batch, total), np.int64),
        "ptr_image_mask": np.zeros((batch, seq), np.int64),
        "ptr_instruction_mask": np.zeros((batch, seq), np.int64),
        "ptr_k_fraction": np.array(0.0, np.float32),
    }
    return {k: v for k, v in feeds.items() if k in decoder.inputs}


def base_feeds(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict:
    """The decoder's model inputs from torch tensors."""
    return {
        "inputs_embeds": embeds.numpy().astype(np.float32),
        "attention_mask": mask.numpy().astype(np.int64),
        "position_ids": positions.numpy().astype(np.int64),
    }
