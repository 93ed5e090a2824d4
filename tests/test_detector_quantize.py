"""Quantized detector variants (int8, qdq, fp16): they run, stay close to fp32, are picked right."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from vlmguard.guard_models.detector_export import (  # noqa: E402
    export_detector,
    write_detector_dir,
)
from vlmguard.guard_models.quantize import UnknownQuantizeModeError, parse_quantize  # noqa: E402
from vlmguard.guard_models.synthetic import calibration_scenes  # noqa: E402
from vlmguard.guard_models.tiny import save_tiny_checkpoint, words_of  # noqa: E402
from vlmguard.runtime.detector import SafetyDetector  # noqa: E402
from vlmguard.runtime.detector_variants import pick_variant  # noqa: E402
from vlmguard.runtime.image_preprocess import preprocess_image  # noqa: E402

torch.set_num_threads(1)
ALL = ["fp32", "int8", "qdq", "fp16"]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def detector_dir(request, tmp_path_factory):
    """A tiny checkpoint exported with every variant (default concept bank)."""
    from vlmguard.guard_models.concepts import load_concept_bank

    root = tmp_path_factory.mktemp(f"q_{request.param}")
    words = words_of(v for c in load_concept_bank().categories for v in c.variants)
    checkpoint = save_tiny_checkpoint(root / "ckpt", request.param, words, seed=3)
    manifest = export_detector(str(checkpoint), root / "det", quantize="int8,qdq,fp16")
    write_detector_dir(manifest, root / "det")
    return root / "det"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("variant", ["int8", "qdq", "fp16"])
def test_variant_runs_and_stays_close_to_fp32(detector_dir, variant: str) -> None:
    """Each variant's embeddings and scores stay close to the fp32 graph's."""
    fp32 = SafetyDetector.load(detector_dir, variant="fp32")
    scenes = calibration_scenes(6, seed=99)  # held out: calibration used seed 0
    pixels = np.concatenate([preprocess_image(scene, fp32.preprocessor) for scene in scenes])
    reference = SafetyDetector.load(detector_dir, variant="fp32").run(pixels)
    got = SafetyDetector.load(detector_dir, variant=variant).run(pixels)
    assert _cosine(got["det_image_embeds"], reference["det_image_embeds"]).min() >= 0.99
    patch_cos = _cosine(got["det_patch_embeds"], reference["det_patch_embeds"])
    assert patch_cos.min() >= 0.98
    tolerance = 1e-3 if variant == "fp16" else 5e-2
    for name in ("det_score_global", "det_score_ot", "det_global_cosine"):
        np.testing.assert_allclose(got[name], reference[name], atol=tolerance, err_msg=name)
    assert all(got[name].dtype == np.float32 for name in got)


def test_variant_graphs_have_the_promised_form(detector_dir) -> None:
    """int8 is MatMulInteger, qdq is symmetric S8S8, fp16 has half weights; head stays fp32."""
    graphs = {
        v: onnx.load(str(detector_dir / "onnx" / name))
        for v, name in [
            ("int8", "safety_detector_int8.onnx"),
            ("qdq", "safety_detector_qdq.onnx"),
            ("fp16", "safety_detector_fp16.onnx"),
        ]
    }
    int8_ops = {node.op_type for node in graphs["int8"].graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= int8_ops
    for graph in graphs.values():
        head_ops = {n.op_type for n in graph.graph.node if n.name.startswith("/head/")}
        assert head_ops and not head_ops & {"MatMulInteger", "QuantizeLinear", "DequantizeLinear"}
    qdq = graphs["qdq"].graph
    inits = {t.name: t for t in qdq.initializer}
    zero_points = [n.input[2] for n in qdq.node if n.op_type == "QuantizeLinear"]
    assert zero_points
    for name in zero_points:
        tensor = inits[name]
        assert tensor.data_type == onnx.TensorProto.INT8
        assert not onnx.numpy_helper.to_array(tensor).any()  # symmetric: zero point 0
    fp16 = graphs["fp16"].graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.initializer)
    assert fp16.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize(
    "providers,available,expected",
    [
        (["CPUExecutionProvider"], ALL, "int8"),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], ALL, "fp16"),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider"], ALL, "qdq"),
        (["CUDAExecutionProvider"], ["fp32", "int8"], "fp32"),  # never dynamic int8 on CUDA
        (["TensorrtExecutionProvider"], ["fp32", "int8", "fp16"], "fp16"),
        (["CPUExecutionProvider"], ["fp32", "fp16"], "fp32"),
    ],
)
def test_variant_picker(providers, available, expected) -> None:
    """The picker fits the first provider and never gives dynamic int8 to a GPU provider."""
    assert pick_variant(providers, available) == expected


def test_detector_load_picks_int8_on_cpu(detector_dir) -> None:
    """Loading on the CPU provider opens the dynamic int8 graph."""
    detector = SafetyDetector.load(detector_dir, providers=["CPUExecutionProvider"])
    assert detector.variant == "int8" and detector.path.name == "safety_detector_int8.onnx"


def test_unknown_quantize_mode_is_rejected(tmp_path) -> None:
    """An unknown mode is a ValueError naming the valid ones, raised before any export work."""
    with pytest.raises(UnknownQuantizeModeError, match="int8, qdq, fp16, none"):
        export_detector(str(tmp_path / "not-even-there"), tmp_path / "out", quantize="int4")
    assert parse_quantize("none") == [] and parse_quantize(["fp16", "int8"]) == ["fp16", "int8"]
