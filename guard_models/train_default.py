"""Train, export, calibrate and evaluate the default safety detector from a fixed seed.

    python -m vlmguard.guard_models.train_default [--steps N] [--out DIR]

A small CLIP-style dual encoder (a Hugging Face `CLIPModel`, so the normal export path
serves it) learns from procedurally generated scenes (`synthetic`): pictograms and
typography of safe and unsafe concepts, alone and among benign clutter, small and large,
with captions built as task x concept (docs/guards.md, the safety detector); the first 30%
of steps see easier scenes (little clutter, mostly large pictograms). Loss [ours]: symmetric
InfoNCE with several positives (a scene shows several concepts; every concept present is a
positive) on the pooled image embedding, plus the same loss on the best-matching patch
embedding per text (FILIP-style token-wise max), which gives the patch tokens the meaning
the OT head needs.

Data streams: training, validation (thresholds) and test (the report) draw scenes from
three different seeds; the script never trains on validation or test scenes. Outputs in
runtime/data/default_detector/: checkpoint/, concepts.json, thresholds.json,
detector_config.json + onnx/ (fp32, int8, qdq, fp16) and evaluation.json. Offline half (torch).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .evaluation import IMAGE_SIZE, SEED, SPLIT_SEEDS, calibrate, evaluate
from .synthetic import CONCEPTS, TASKS, UNSAFE_CONCEPTS, caption, make_scene, sample_scene
from .tiny import build_tokenizer, words_of

__all__ = ["default_bank", "build_model", "train", "save_checkpoint", "main"]

PATCH_SIZE = 12
WIDTH = 128
TEXT_LENGTH = 16
CATEGORIES = {
    "weapons": ["gun", "knife"],
    "explosives": ["bomb", "grenade"],
    "drugs": ["syringe", "pills"],
    "death and gore": ["skull", "blood"],
}
VARIANT_TASKS = ["a drawing of a {}", "the word {}", "an icon of a {}"]


def default_bank() -> dict[str, Any]:
    """The default detector's concept bank: its unsafe concepts grouped into categories."""
    categories = [
        {
            "name": name,
            "sources": ["vlmguard synthetic"],
            "variants": [caption(task, concept) for concept in concepts for task in VARIANT_TASKS],
        }
        for name, concepts in CATEGORIES.items()
    ]
    return {
        "description": "Concept bank of vlmguard's default detector (trained on synthetic "
        "pictograms and typography). Its text tower knows only the training vocabulary: "
        "variants must be built from the concepts and task templates in synthetic.py.",
        "categories": categories,
    }


def _vocabulary() -> list[str]:
    """Every word a caption or concept-bank variant can use."""
    texts = [caption(task, concept) for task in TASKS + VARIANT_TASKS for concept in CONCEPTS]
    return words_of(texts)


def build_model(seed: int = SEED) -> tuple[Any, Any, Any]:
    """A fresh small CLIPModel, its word-level tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(_vocabulary(), max_length=TEXT_LENGTH)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": WIDTH,
            "intermediate_size": 2 * WIDTH,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": TEXT_LENGTH,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": WIDTH,
            "intermediate_size": 2 * WIDTH,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        projection_dim=WIDTH,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return model, tokenizer, processor


def _pixels(images: list[np.ndarray], processor_config: dict[str, Any]) -> torch.Tensor:
    """Normalise a batch of IMAGE_SIZE uint8 images exactly as the processor would."""
    mean = np.asarray(processor_config["image_mean"], np.float32)[:, None, None]
    std = np.asarray(processor_config["image_std"], np.float32)[:, None, None]
    batch = np.stack(images).transpose(0, 3, 1, 2).astype(np.float64) / 255
    return torch.from_numpy((batch.astype(np.float32) - mean) / std)


def _multi_positive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over [images, texts] logits where any present concept is a positive."""
    image_rows = labels.sum(1) > 0
    text_cols = labels.sum(0) > 0
    to_text = labels[image_rows] / labels[image_rows].sum(1, keepdim=True)
    to_image = labels[:, text_cols] / labels[:, text_cols].sum(0, keepdim=True)
    loss_i = -(to_text * F.log_softmax(logits[image_rows], dim=1)).sum(1).mean()
    loss_t = -(to_image * F.log_softmax(logits[:, text_cols], dim=0)).sum(0).mean()
    return (loss_i + loss_t) / 2


def _training_scene(rng: np.random.Generator, progress: float):
    """A training scene; the first 30% of steps use easier ones (curriculum, [ours])."""
    if progress >= 0.3:
        return sample_scene(rng, IMAGE_SIZE)
    concept = CONCEPTS[rng.integers(len(CONCEPTS))]
    return make_scene(
        rng,
        IMAGE_SIZE,
        concept,
        typography=bool(rng.random() < 0.15),
        small=bool(rng.random() < 0.3),
        clutter=int(rng.integers(0, 3)),
    )


def train(
    steps: int, batch_size: int = 64, seed: int = SEED, log_every: int = 25
) -> tuple[Any, Any, Any]:
    """Train the dual encoder on fresh training scenes; return (model, tokenizer, processor)."""
    torch.manual_seed(seed)
    model, tokenizer, processor = build_model(seed)
    config = json.loads(processor.to_json_string())
    patch_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = [*model.parameters(), patch_scale]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rng = np.random.default_rng(SPLIT_SEEDS["train"])
    start = time.time()
    model.train()
    for step in range(steps):
        scenes = [_training_scene(rng, step / steps) for _ in range(batch_size)]
        tasks = rng.integers(len(TASKS), size=len(CONCEPTS))
        texts = [caption(TASKS[t], c) for t, c in zip(tasks, CONCEPTS, strict=True)]
        labels = torch.tensor(
            [[c in s.concepts for c in CONCEPTS] for s in scenes], dtype=torch.float32
        )
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        hidden = model.vision_model(pixel_values=_pixels([s.image for s in scenes], config))
        embeds = model.visual_projection(
            model.vision_model.post_layernorm(hidden.last_hidden_state)
        )
        image = F.normalize(embeds[:, 0], dim=-1)
        patches = F.normalize(embeds[:, 1:], dim=-1)
        global_logits = model.logit_scale.exp() * image @ text.T
        patch_cos = torch.einsum("bpd,td->btp", patches, text).amax(dim=2)
        patch_logits = patch_scale.exp() * patch_cos
        loss = _multi_positive_loss(global_logits, labels) + _multi_positive_loss(
            patch_logits, labels
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps - 1:
            top = global_logits.argmax(1)
            hit = labels[torch.arange(len(top)), top].mean().item()
            print(
                f"step {step:4d} loss {loss.item():.3f} top1-present {hit:.2f} "
                f"scale {model.logit_scale.exp().item():.1f} {time.time() - start:.0f}s",
                flush=True,
            )
    return model.eval(), tokenizer, processor


def save_checkpoint(model: Any, tokenizer: Any, processor: Any, out: Path) -> Path:
    """Write the model, tokenizer and image processor as a Hugging Face checkpoint."""
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Reproduce the default detector: train, save, export, calibrate, evaluate."""
    from vlmguard.runtime.detector import default_detector_dir

    from .detector_export import export_detector, write_detector_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=default_detector_dir())
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="Reuse OUT/checkpoint; only export, calibrate and evaluate.",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_training:
        model, tokenizer, processor = train(args.steps)
        save_checkpoint(model, tokenizer, processor, out / "checkpoint")
    (out / "concepts.json").write_text(json.dumps(default_bank(), indent=2) + "\n")
    manifest = export_detector(str(out / "checkpoint"), out, out / "concepts.json", "int8,qdq,fp16")
    manifest["source"] = "default"
    write_detector_dir(manifest, out)
    thresholds = calibrate(out, args.eval_images)
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    manifest["thresholds"] = thresholds
    write_detector_dir(manifest, out)
    report = evaluate(out, thresholds, args.eval_images)
    report["thresholds"] = thresholds
    report["training"] = {
        "steps": args.steps,
        "seed": SEED,
        "unsafe_concepts": list(UNSAFE_CONCEPTS),
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
