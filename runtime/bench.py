"""Per-stage latency of a bundle through GuardedVLM, guarded vs neutral (`vlmguard bench`).

Lean like the rest of the runtime, so it runs on the board users ship to: every figure comes
from the GuardReport's stage timers of real `generate` calls, measured side by side in one
process. Peers (transformers, onnxruntime-genai) live on the export side (export/bench_peers.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlmguard.errors import VlmguardError

from .guarded_vlm import GuardedVLM
from .image_preprocess import preprocess_image
from .policy import GuardPolicy

# The request path's stages, in order; "decode" is every step after the first token.
STAGES = ("preprocess", "tokenize", "detector", "vision_encoder", "prefill", "decode")
PROMPT_WORDS = "please describe what the picture shows and what each part of it is for".split()


class BenchError(VlmguardError):
    """The benchmark cannot run as asked (bad settings, or the bundle refused its request)."""


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures."""

    prompt_tokens: int = 64
    new_tokens: int = 32
    image_size: int = 336
    runs: int = 10
    warmup: int = 2

    def validate(self) -> None:
        """Refuse settings that cannot give a figure."""
        flags = {"new_tokens": "max-new-tokens"}  # the CLI's name for the answer length
        for name in ("prompt_tokens", "new_tokens", "image_size", "runs"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{flags.get(name, name.replace('_', '-'))} must be at least 1")
        if self.warmup < 0:
            raise BenchError("--warmup must be 0 or more")
        if self.new_tokens < 2:
            raise BenchError("--max-new-tokens must be at least 2 to time a decode step")


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation), mean and count of a list of figures."""
    if not values:
        raise BenchError("no measurements to summarize")
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(array.mean()),
        "n": len(values),
    }


def bench_prompt(vlm: GuardedVLM, tokens: int) -> str:
    """User text of at least `tokens` tokens (and as few more as whole words allow).

    Linear in `tokens`: one encode of a text long enough (each word is at least one token), cut
    after the word holding the `tokens`-th token, and one encode to check the cut (bisecting
    took O(log n) encodes of the whole text: 300,000 tokens in 9 s).
    """
    if tokens <= 0:
        return ""
    tokenizer = vlm.prompts.tokenizer
    words = tokens
    while True:
        text = _words(words)
        encoding = tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) >= tokens:
            break
        words *= 2  # a tokenizer that merges words: rare, and at most a few rounds
    end = encoding.offsets[tokens - 1][1]  # where the token that reaches the count ends
    cut = text.find(" ", end)
    prompt = text if cut < 0 else text[:cut]
    while len(tokenizer.encode(prompt, add_special_tokens=False).ids) < tokens:
        # only where the prefix tokenizes differently from the whole text
        prompt = _words(len(prompt.split()) + 1)  # pragma: no cover
    return prompt


def _words(count: int) -> str:
    """The first `count` words of the benchmark text (PROMPT_WORDS repeated)."""
    repeats = -(-count // len(PROMPT_WORDS))
    return " ".join((PROMPT_WORDS * repeats)[:count])


def check_fits_context(vlm: GuardedVLM, settings: BenchSettings) -> None:
    """Refuse, before building any prompt, a benchmark request that cannot fit the context."""
    context = vlm.context
    rows = vlm.prompts.tokens_per_image
    needed = settings.prompt_tokens + rows + settings.new_tokens
    if needed > context:
        raise BenchError(
            f"--prompt-tokens {settings.prompt_tokens} plus the image's {rows} rows and "
            f"--max-new-tokens {settings.new_tokens} need at least {needed} tokens, past the "
            f"model's context of {context}; at most {max(0, context - rows - settings.new_tokens)}"
            " prompt tokens can fit (fewer with the chat template and guard prefixes)"
        )


def bench_image(size: int, seed: int = 0) -> Image.Image:
    """A square noise image of the given side, as a user's photo would arrive (RGB, uint8)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def measure(
    vlm: GuardedVLM, image: Image.Image, prompt: str, settings: BenchSettings
) -> list[dict]:
    """Run warm-up plus timed requests; one record per timed run (ms, and decoded tokens)."""
    samples = []
    for run in range(settings.warmup + settings.runs):
        started = time.perf_counter()
        result = vlm.generate(image, prompt, max_new_tokens=settings.new_tokens, ignore_eos=True)
        end_to_end = (time.perf_counter() - started) * 1e3
        report = result.report
        if report.refused:
            raise BenchError(
                f"the bundle refused the benchmark request ({report.refusal_reason}); "
                "fix the bundle or policy first (try `vlmguard run`)"
            )
        if run < settings.warmup:
            continue
        stages = {stage: report.timings_ms.get(stage, 0.0) for stage in STAGES}
        samples.append(
            {
                "stages": stages,
                "end_to_end": end_to_end,
                "ttft": report.timings_ms["total"] - report.timings_ms["decode"],
                "decode_steps": len(report.decode_step_ms),
                "providers": report.providers,
            }
        )
    return samples


def time_requests(vlm: GuardedVLM, settings: BenchSettings, prompt: str | None = None) -> dict:
    """Summary of the benchmark request (its prompt and image) run through `vlm`."""
    if prompt is None:
        check_fits_context(vlm, settings)
        prompt = bench_prompt(vlm, settings.prompt_tokens)
    return summarize(measure(vlm, bench_image(settings.image_size), prompt, settings))


def summarize(samples: list[dict]) -> dict:
    """Percentiles per stage, end to end and TTFT; decode tokens/s; how well stages add up."""
    stages = {
        stage: percentiles([s["stages"][stage] for s in samples])
        for stage in STAGES
        if any(s["stages"][stage] > 0 for s in samples)
    }
    rates = [s["decode_steps"] / (s["stages"]["decode"] / 1e3) for s in samples]
    covered = [sum(s["stages"].values()) / s["end_to_end"] for s in samples]
    return {
        "stages": stages,
        "end_to_end": percentiles([s["end_to_end"] for s in samples]),
        "ttft": percentiles([s["ttft"] for s in samples]),
        "decode_tokens_per_s": float(np.median(rates)),
        "stage_sum_over_end_to_end": float(np.median(covered)),
    }


def ratios(numerator: dict, denominator: dict) -> dict[str, float]:
    """p50 ratio per stage (and end to end, TTFT, decode step time) of two summaries."""
    keys = set(numerator["stages"]) & set(denominator["stages"])
    out = {k: numerator["stages"][k]["p50"] / denominator["stages"][k]["p50"] for k in keys}
    for key in ("end_to_end", "ttft"):
        out[key] = numerator[key]["p50"] / denominator[key]["p50"]
    out["decode_time_per_token"] = (
        denominator["decode_tokens_per_s"] / numerator["decode_tokens_per_s"]
    )
    return dict(sorted(out.items()))


def detector_variants(vlm: GuardedVLM, image: Image.Image, settings: BenchSettings) -> dict:
    """p50 of each exported detector variant on the same pixels, on the bundle's providers."""
    if vlm.detector is None:
        return {}
    from vlmguard.runtime.detector import SafetyDetector

    manifest = vlm.manifest.detector
    pixels = None
    out = {}
    for variant in manifest["files"]:
        try:
            detector = SafetyDetector(manifest, vlm.engine.bundle, vlm.engine.providers, variant)
        except Exception as err:  # a variant this provider cannot open is reported, not fatal
            out[variant] = {"error": str(err).splitlines()[0]}
            continue
        if pixels is None:
            pixels = preprocess_image(image, detector.preprocessor)
        times = []
        for run in range(settings.warmup + settings.runs):
            started = time.perf_counter()
            detector.run(pixels)
            if run >= settings.warmup:
                times.append((time.perf_counter() - started) * 1e3)
        out[variant] = percentiles(times)
    return out


def bench_bundle(
    bundle: str | Path,
    settings: BenchSettings,
    providers: list[str] | str | None = None,
    policy: GuardPolicy | None = None,
    on_step: Callable[[str], None] = lambda step: None,
) -> dict:
    """Guarded (the policy's guards) and neutral runs of one bundle, with their ratios."""
    settings.validate()
    vlm = GuardedVLM.load(bundle, providers=providers, policy=policy)
    neutral = GuardedVLM(vlm.engine, GuardPolicy.neutral())  # same sessions, guards neutral
    check_fits_context(vlm, settings)  # before building a prompt of that length
    prompt = bench_prompt(vlm, settings.prompt_tokens)
    on_step("timing the policy's guards")
    guarded = time_requests(vlm, settings, prompt)
    on_step("timing the same bundle with every guard neutral")
    plain = time_requests(neutral, settings, prompt)
    on_step("timing the detector variants")
    return {
        "bundle": str(bundle),
        "settings": settings.__dict__,
        "prompt": prompt,
        "prefill_tokens": vlm.prompts.token_count(prompt, True),
        "providers_used": vlm.engine.used_providers,
        "guarded": guarded,
        "neutral": plain,
        "guard_ratio": ratios(guarded, plain),
        "detector_variants": detector_variants(vlm, bench_image(settings.image_size), settings),
    }
