"""CPU latency of detector variants, side by side (fp32 vs int8, default vs ViT-B/32 shape).

    python -m vlmguard.guard_models.benchmark [--threads 1] [--runs 20]

Measures one image (batch 1) through the ONNX graph with ONNX Runtime's CPU provider,
median over runs after warm-up, for the packaged default detector and for a random CLIP
whose vision tower has ViT-B/32's shape (224 px, patch 32, width 768, 12 layers). Offline
half: building the random ViT-B/32 needs torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["time_variant", "vit_b32_detector", "main"]


def time_variant(detector_dir: Path, variant: str, threads: int, runs: int) -> float:
    """Median milliseconds for one image through one variant."""
    import onnxruntime as ort

    manifest = json.loads((detector_dir / "detector_config.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(detector_dir / manifest["files"][variant]), options, providers=["CPUExecutionProvider"]
    )
    side = manifest["inputs"]["pixel_values"]["shape"][2]
    pixels = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"pixel_values": pixels})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"pixel_values": pixels})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def vit_b32_detector(out_dir: Path) -> Path:
    """Export a random CLIP with ViT-B/32's vision shape (small text tower) with int8."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    from .concepts import load_concept_bank
    from .detector_export import export_detector, write_detector_dir
    from .tiny import build_tokenizer, words_of

    bank = load_concept_bank()
    tokenizer = build_tokenizer(words_of(v for c in bank.categories for v in c.variants), 32)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 512,
            "intermediate_size": 1024,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "max_position_embeddings": 32,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=512,
    )
    torch.manual_seed(0)
    checkpoint = out_dir / "checkpoint"
    CLIPModel(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    CLIPImageProcessorPil().save_pretrained(checkpoint)
    manifest = export_detector(str(checkpoint), out_dir / "det", quantize="int8")
    write_detector_dir(manifest, out_dir / "det")
    return out_dir / "det"


def main(argv: list[str] | None = None) -> None:
    """Print a latency table for the default detector and a ViT-B/32-shaped CLIP."""
    from vlmguard.runtime.detector import default_detector_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        detectors = {
            "default (96 px, ViT 4x128)": default_detector_dir(),
            "random CLIP, ViT-B/32 shape": vit_b32_detector(Path(scratch)),
        }
        for name, directory in detectors.items():
            fp32 = time_variant(directory, "fp32", args.threads, args.runs)
            int8 = time_variant(directory, "int8", args.threads, args.runs)
            rows.append(
                {
                    "detector": name,
                    "fp32_ms": round(fp32, 2),
                    "int8_ms": round(int8, 2),
                    "speedup": round(fp32 / int8, 2),
                }
            )
    print(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
