"""Detector graph variants (fp32, int8, qdq, fp16) and which one fits a provider list.

Dynamic INT8 (MatMulInteger) is for the CPU only: on the CUDA provider it falls back to the
host and is slower than fp32, so CUDA gets fp16 and TensorRT gets static symmetric QDQ.
Torch-free: the runtime uses the picker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "FP32",
    "INT8",
    "QDQ",
    "FP16",
    "VARIANT_FILES",
    "QUANTIZE_MODES",
    "UnknownQuantizeModeError",
    "parse_quantize",
    "preferred_variants",
    "pick_variant",
]

FP32, INT8, QDQ, FP16 = "fp32", "int8", "qdq", "fp16"
VARIANT_FILES = {
    FP32: "onnx/safety_detector.onnx",
    INT8: "onnx/safety_detector_int8.onnx",
    QDQ: "onnx/safety_detector_qdq.onnx",
    FP16: "onnx/safety_detector_fp16.onnx",
}
QUANTIZE_MODES = (INT8, QDQ, FP16, "none")


class UnknownQuantizeModeError(ValueError):
    """A quantize mode other than int8, qdq, fp16 or none was asked for."""


def parse_quantize(quantize: str | Sequence[str]) -> list[str]:
    """Turn 'int8', 'int8,fp16' or a list of modes into the variants to build beyond fp32."""
    items = quantize.split(",") if isinstance(quantize, str) else list(quantize)
    modes: list[str] = []
    for item in items:
        mode = item.strip().lower()
        if mode not in QUANTIZE_MODES:
            raise UnknownQuantizeModeError(
                f"unknown quantize mode '{item}'; use one or more of {', '.join(QUANTIZE_MODES)}."
            )
        if mode != "none" and mode not in modes:
            modes.append(mode)
    return modes


def preferred_variants(providers: Iterable[str]) -> list[str]:
    """Variants in order of preference for the first (highest-priority) provider."""
    first = next(iter(providers), "CPUExecutionProvider")
    if first == "TensorrtExecutionProvider":
        return [QDQ, FP16, FP32]
    if first in ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider"):
        return [FP16, FP32]  # never dynamic INT8 on a GPU provider
    return [INT8, FP32]


def pick_variant(providers: Iterable[str], available: Iterable[str]) -> str:
    """The best available variant for these providers (fp32 when nothing better exists)."""
    have = set(available)
    for variant in preferred_variants(providers):
        if variant in have:
            return variant
    if FP32 in have:
        return FP32
    raise FileNotFoundError(f"no usable detector variant among {sorted(have)}; re-export it.")
