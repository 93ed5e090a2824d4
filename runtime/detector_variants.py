"""Detector graph variants (fp32, int8, qdq, fp16), their files, and which one fits a provider list.

Dynamic INT8 (MatMulInteger) is for the CPU only: on the CUDA provider it falls back to the
host and is slower than fp32, so CUDA gets fp16 and TensorRT gets static symmetric QDQ.
Online half (stdlib only); the exporter writes the files named here.
"""

from __future__ import annotations

from collections.abc import Iterable

from vlmguard.errors import VlmguardError

__all__ = [
    "FP32",
    "INT8",
    "QDQ",
    "FP16",
    "VARIANTS",
    "VARIANT_FILES",
    "NoDetectorVariantError",
    "preferred_variants",
    "pick_variant",
]

FP32, INT8, QDQ, FP16 = "fp32", "int8", "qdq", "fp16"
VARIANTS = (FP32, INT8, QDQ, FP16)
VARIANT_FILES = {
    FP32: "onnx/safety_detector.onnx",
    INT8: "onnx/safety_detector_int8.onnx",
    QDQ: "onnx/safety_detector_qdq.onnx",
    FP16: "onnx/safety_detector_fp16.onnx",
}


class NoDetectorVariantError(VlmguardError, FileNotFoundError):
    """A detector manifest lists no variant this runtime can use."""


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
    raise NoDetectorVariantError(f"no usable detector variant among {sorted(have)}; re-export it.")
