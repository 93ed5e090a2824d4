"""The benchmark's torch-side half: reference models and the peers we are compared against.

- `build_reference`: the random `tiny`/`small` LLaVA checkpoints plus a plain and a guarded
  bundle of each, so anyone can reproduce the figures (`vlmguard bench --model-shape`).
- `torch_peer`: transformers' eager `generate` on the same weights, image and prompt.
- `genai_peer`: onnxruntime-genai on the same language model, built with its model builder
  from the same checkpoint (text only: genai's builder does not take LLaVA; the prompt is as
  long as our prefill, image rows included, so both decode over the same context length).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vlmguard.errors import VlmguardError
from vlmguard.manifest import read_manifest

BENCH_CACHE = Path.home() / ".cache" / "vlmguard" / "bench"


class PeerError(VlmguardError):
    """A peer cannot be measured here (not installed, or its build failed)."""


def _summary(ttft_ms: list[float], total_ms: list[float], new_tokens: int) -> dict:
    """TTFT and end-to-end percentiles and decode tokens/s from paired timings."""
    from vlmguard.runtime.bench import percentiles

    decode = [(t - f) / 1e3 for t, f in zip(total_ms, ttft_ms, strict=True)]
    return {
        "ttft": percentiles(ttft_ms),
        "end_to_end": percentiles(total_ms),
        "decode_tokens_per_s": float(np.median([(new_tokens - 1) / d for d in decode])),
    }


def build_reference(shape: str, workdir: Path, on_step=lambda step: None) -> dict[str, Path]:
    """The reference checkpoint and its plain and guarded bundles (reused when already built)."""
    from .exporter import export_bundle
    from .tiny_model import build_tiny_llava

    root = workdir / shape
    paths = {name: root / name for name in ("checkpoint", "plain", "guarded")}
    if not (paths["checkpoint"] / "config.json").is_file():
        on_step(f"building the random {shape} checkpoint")
        vision = "siglip" if shape == "small" else "clip"  # small: SmolVLM-256M-shaped
        build_tiny_llava(paths["checkpoint"], vision=vision, shape=shape, force=True)
    for kind, defenses, detector in (
        ("plain", frozenset(), None),
        ("guarded", frozenset({"oh", "ptr", "align"}), "default"),
    ):
        try:
            read_manifest(paths[kind])
        except VlmguardError:
            on_step(f"exporting the {kind} {shape} bundle")
            export_bundle(paths["checkpoint"], paths[kind], defenses, detector=detector, force=True)
    return paths


def torch_peer(
    source: str | Path,
    image: object,
    prompt: str,
    new_tokens: int,
    runs: int,
    warmup: int,
    device: str = "cpu",
) -> dict:
    """transformers' eager generate (fp32) on the same checkpoint, image, prompt and device."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.generation.streamers import BaseStreamer

    from .source import resolve_source

    path = resolve_source(str(source))
    processor = AutoProcessor.from_pretrained(path)
    model = (
        AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        .eval()
        .to(device)
    )
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)

    class FirstToken(BaseStreamer):
        """Notes when generate hands over its first new token (its second `put`)."""

        def __init__(self) -> None:
            self.puts, self.at = 0, 0.0

        def put(self, value: object) -> None:
            self.puts += 1
            if self.puts == 2:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def timed() -> tuple[float, float]:
        streamer = FirstToken()
        started = time.perf_counter()
        inputs = processor(images=image, text=text, return_tensors="pt").to(device)
        with torch.no_grad():
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=streamer,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return (streamer.at - started) * 1e3, (time.perf_counter() - started) * 1e3

    for _ in range(warmup):
        timed()
    pairs = [timed() for _ in range(runs)]
    first, total = [p[0] for p in pairs], [p[1] for p in pairs]
    what = f"transformers eager generate, fp32, {device}"
    return _summary(first, total, new_tokens) | {"what": what}


def language_model_checkpoint(source: str | Path, out: Path) -> Path:
    """Save the LLaVA checkpoint's language model (with its LM head) as a causal-LM checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from .source import resolve_source

    path = resolve_source(str(source))
    if (out / "config.json").is_file():
        return out
    vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    lm = AutoModelForCausalLM.from_config(vlm.config.text_config)
    weights = {"model." + k: v for k, v in vlm.model.language_model.state_dict().items()}
    weights["lm_head.weight"] = vlm.lm_head.weight
    lm.load_state_dict(weights, strict=True)
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def genai_peer(
    source: str | Path,
    workdir: Path,
    prefill_tokens: int,
    new_tokens: int,
    runs: int,
    warmup: int,
    device: str = "cpu",
) -> dict:
    """onnxruntime-genai on the same language model: TTFT and decode tokens/s, greedy."""
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        raise PeerError(
            "onnxruntime-genai is not installed; `pip install --no-deps onnxruntime-genai` "
            "(--no-deps keeps it from replacing onnxruntime-gpu with the CPU build)"
        ) from err
    lm = language_model_checkpoint(source, workdir / "language_model")
    built = workdir / f"genai_fp32_{device}"
    if not (built / "genai_config.json").is_file():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(lm),
                   "-i", str(lm), "-o", str(built), "-p", "fp32", "-e", device,
                   "-c", str(workdir / "genai_cache")]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise PeerError(f"onnxruntime-genai's model builder failed: {' '.join(tail)}")
    model = og.Model(str(built))
    vocab = int(json.loads((lm / "config.json").read_text())["vocab_size"])
    prompt = np.random.default_rng(0).integers(3, vocab, prefill_tokens).astype(np.int32)

    def timed() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        length = prefill_tokens + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt)  # the prefill
        generator.generate_next_token()  # picks the first token
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        end = time.perf_counter()
        if len(generator.get_sequence(0)) != length:
            raise PeerError("onnxruntime-genai stopped early; its figures would not compare")
        return (first - started) * 1e3, (end - started) * 1e3

    for _ in range(warmup):
        timed()
    pairs = [timed() for _ in range(runs)]
    summary = _summary([p[0] for p in pairs], [p[1] for p in pairs], new_tokens)
    return summary | {"what": f"onnxruntime-genai {og.__version__}, fp32, {device}, text only"}


def torch_device_bandwidth(megabytes: int = 1024, repeats: int = 10) -> float | None:
    """GPU memory bandwidth in bytes/s (device-to-device copy) through torch, if it sees a GPU."""
    import torch

    from vlmguard.runtime.bench_env import copy_rate

    if not torch.cuda.is_available():
        return None
    source = torch.ones(megabytes * (1 << 20) // 4, device="cuda")
    target = torch.empty_like(source)
    nbytes = source.numel() * source.element_size()
    return copy_rate(lambda: target.copy_(source), torch.cuda.synchronize, nbytes, repeats)
