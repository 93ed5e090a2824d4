"""Which detector variants to build, and the quantized ones: dynamic INT8 (CPU), static QDQ (TRT).

Only the vision tower is quantized. The head (cosines, entropy mass, Sinkhorn) stays fp32
in every variant: it is a few small ops, and Sinkhorn in int8 would lose the precision the
OT scores need. (fp16 is exported straight from PyTorch with a half tower, see
detector_export: onnxruntime's float16 converter round-trips every blocked edge through
fp16.) Offline half (onnx, onnxruntime.quantization, both imported only when quantizing, so
`parse_quantize` can check a command line before any export work).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmguard.errors import VlmguardError
from vlmguard.quiet import drop_dependency_advice
from vlmguard.runtime.detector_variants import FP16, INT8, QDQ
from vlmguard.runtime.image_preprocess import ImageInput, preprocess_image

if TYPE_CHECKING:
    import onnx

__all__ = [
    "QUANTIZE_MODES",
    "NoCalibrationImagesError",
    "UnknownQuantizeModeError",
    "default_calibration_images",
    "head_node_names",
    "parse_quantize",
    "quantize_variant",
]

QUANTIZE_MODES = (INT8, QDQ, FP16, "none")


class UnknownQuantizeModeError(VlmguardError, ValueError):
    """A quantize mode other than int8, qdq, fp16 or none was asked for."""


class NoCalibrationImagesError(VlmguardError, ValueError):
    """QDQ quantization was given an empty set of calibration images."""


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


HEAD_SCOPE = "/head/"  # export_onnx(scope_node_names=True) names nodes by module scope
TOWER_OPS = ["MatMul", "Gemm", "Conv"]


def head_node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that belong to the detector head (kept in fp32)."""
    return [node.name for node in model.graph.node if node.name.startswith(HEAD_SCOPE)]


def default_calibration_images(count: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Calibration images when the user gives none: procedural scenes from our generator."""
    from .synthetic import calibration_scenes

    return calibration_scenes(count, seed)


class _ImageReader:
    """A CalibrationDataReader over preprocessed images."""

    def __init__(self, images: Sequence[ImageInput], processor_config: dict[str, Any]) -> None:
        """Preprocess every calibration image up front."""
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{"pixel_values": preprocess_image(image, processor_config)} for image in images]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration batch, or None when done."""
        return next(self._batches, None)


def _quantize_int8(source: Path, target: Path, exclude: list[str]) -> None:
    """Dynamic INT8 (MatMulInteger), signed weights: for the CPU provider only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with drop_dependency_advice():  # ORT's pre-processing advice: nothing the user can do
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=TOWER_OPS,
            nodes_to_exclude=exclude,
            per_channel=False,
        )


def _quantize_qdq(
    source: Path,
    target: Path,
    exclude: list[str],
    processor_config: dict[str, Any],
    images: Sequence[ImageInput] | None,
) -> None:
    """Static symmetric S8S8 QDQ with calibration images: what TensorRT accepts."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    images = list(images) if images is not None else default_calibration_images()
    if not images:
        raise NoCalibrationImagesError("QDQ quantization needs at least one calibration image.")
    with drop_dependency_advice():
        quantize_static(
            source,
            target,
            _ImageReader(images, processor_config),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=TOWER_OPS,
            nodes_to_exclude=exclude,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            calibration_providers=["CPUExecutionProvider"],
        )


def quantize_variant(
    variant: str,
    source: Path,
    target: Path,
    processor_config: dict[str, Any],
    calibration_images: Sequence[ImageInput] | None = None,
) -> Path:
    """Write one quantized variant of the fp32 detector graph at `source` to `target`."""
    import onnx

    exclude = head_node_names(onnx.load(str(source), load_external_data=False))
    target.parent.mkdir(parents=True, exist_ok=True)
    if variant == INT8:
        _quantize_int8(source, target, exclude)
    elif variant == QDQ:
        _quantize_qdq(source, target, exclude, processor_config, calibration_images)
    else:
        raise UnknownQuantizeModeError(f"unknown quantize mode '{variant}'; use int8 or qdq.")
    return target
