"""The packaged default detector: present, small, consistent with its checkpoint, and useful."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vlmguard.guard_models.cli import detect
from vlmguard.guard_models.evaluation import IMAGE_SIZE, SEED, evaluate, make_split
from vlmguard.guard_models.sources import resolve_detector_source
from vlmguard.guard_models.synthetic import UNSAFE_CONCEPTS, make_scene, sample_scene
from vlmguard.runtime.detector import SafetyDetector, default_detector_dir
from vlmguard.runtime.detector_variants import pick_variant
from vlmguard.runtime.image_preprocess import preprocess_image

ROOT = default_detector_dir()


def _batch(detector: SafetyDetector, scenes) -> dict[str, np.ndarray]:
    """Run a detector over scenes in one batch."""
    pixels = np.concatenate([preprocess_image(s.image, detector.preprocessor) for s in scenes])
    return detector.run(pixels)


def test_default_files_are_present_and_small() -> None:
    """Checkpoint, bank, thresholds, graphs and report ship, in at most 20 MB."""
    for name in (
        "checkpoint/config.json",
        "checkpoint/model.safetensors",
        "checkpoint/tokenizer.json",
        "checkpoint/preprocessor_config.json",
        "concepts.json",
        "thresholds.json",
        "detector_config.json",
        "onnx/safety_detector.onnx",
        "onnx/safety_detector_int8.onnx",
        "onnx/safety_detector_qdq.onnx",
        "onnx/safety_detector_fp16.onnx",
        "evaluation.json",
    ):
        assert (ROOT / name).is_file(), name
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, total


def test_default_name_resolves_everywhere() -> None:
    """`default` is a detector source for export and for loading."""
    source = resolve_detector_source("default")
    assert source.checkpoint == ROOT / "checkpoint" and source.concepts == ROOT / "concepts.json"
    assert source.thresholds == json.loads((ROOT / "thresholds.json").read_text())
    detector = SafetyDetector.load("default")
    assert detector.variant == "int8"
    files = detector.manifest["files"]
    assert pick_variant(["CUDAExecutionProvider", "CPUExecutionProvider"], files) == "fp16"
    assert pick_variant(["TensorrtExecutionProvider"], files) == "qdq"
    assert detector.thresholds["method"] in ("ot", "global")


def test_committed_graph_matches_a_fresh_export(tmp_path) -> None:
    """The shipped fp32 graph is what the exporter makes from the shipped checkpoint."""
    pytest.importorskip("torch")
    from vlmguard.guard_models.detector_export import export_detector, write_detector_dir

    manifest = export_detector("default", tmp_path, quantize="none")
    write_detector_dir(manifest, tmp_path)
    scenes = [sample_scene(np.random.default_rng(1), IMAGE_SIZE) for _ in range(4)]
    fresh = _batch(SafetyDetector.load(tmp_path, variant="fp32"), scenes)
    shipped = _batch(SafetyDetector.load("default", variant="fp32"), scenes)
    for name, value in shipped.items():
        np.testing.assert_allclose(fresh[name], value, atol=1e-5, err_msg=name)


def test_default_separates_unsafe_from_safe() -> None:
    """On held-out scenes, unsafe images outscore safe ones under the shipped method."""
    detector = SafetyDetector.load("default", variant="fp32")
    scenes = make_split("test", 160)
    key = f"det_score_{detector.thresholds['method']}"
    scores = _batch(detector, scenes)[key]
    unsafe = np.array([s.unsafe for s in scenes])
    # AUC well above chance (0.5): the detector learned the concepts.
    pairs = scores[unsafe][:, None] > scores[~unsafe][None, :]
    assert pairs.mean() > 0.75
    verdicts = scores >= detector.thresholds[detector.thresholds["method"]]
    assert verdicts[~unsafe].mean() <= 0.15  # calibrated for 5% FPR on the validation split


def test_int8_agrees_with_fp32_on_held_out_scenes() -> None:
    """INT8 vs FP32: image-embedding cosine >= 0.99 and the same verdict on >= 97% here."""
    fp32 = SafetyDetector.load("default", variant="fp32")
    int8 = SafetyDetector.load("default", variant="int8")
    scenes = make_split("test", 200)
    a, b = _batch(fp32, scenes), _batch(int8, scenes)
    x, y = a["det_image_embeds"], b["det_image_embeds"]
    cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cosine.min() >= 0.99
    method = fp32.thresholds["method"]
    key, threshold = f"det_score_{method}", fp32.thresholds[method]
    assert np.mean((a[key] >= threshold) == (b[key] >= threshold)) >= 0.97


@pytest.fixture(scope="module")
def fresh_report() -> dict:
    """The held-out test evaluation recomputed now, at the committed report's size and thresholds.

    The full 2,000 images (about 15 s on one core), so the committed report can be compared
    figure by figure rather than only within sampling error.
    """
    committed = json.loads((ROOT / "evaluation.json").read_text())
    thresholds = json.loads((ROOT / "thresholds.json").read_text())
    return evaluate(ROOT, thresholds, committed["images"])


def test_evaluation_report_has_the_promised_figures(fresh_report) -> None:
    """A fresh evaluation reports TPR at 5% FPR for both methods, overall and small objects."""
    report = fresh_report
    for method in ("global", "ot"):
        for key in ("tpr_at_5pct_fpr", "tpr_small_objects", "threshold_at_5pct_fpr"):
            assert 0 <= report["fp32"][method][key] <= 1 or key.startswith("threshold")
    assert report["fp32"]["counts"]["unsafe_small"] > 100
    assert report["int8_vs_fp32"]["image_embedding_cosine_min"] >= 0.99
    assert min(report["int8_vs_fp32"]["same_decision"].values()) >= 0.99


def test_fresh_evaluation_backs_the_readme_figures(fresh_report) -> None:
    """OT beats the global cosine, overall and on small objects, at the calibrated FPR.

    Measured on 2,000 held-out images: TPR at 5% FPR 0.533 (OT) vs 0.359 (global), small
    objects 0.400 vs 0.293; FPR at the shipped thresholds 0.032 (OT) and 0.046 (global). The
    evaluation is deterministic, so the bounds sit 0.05 below (FPR: 0.05 above) those figures
    only to absorb numeric drift across onnxruntime versions and CPUs.
    """
    fp32 = fresh_report["fp32"]
    assert fp32["ot"]["tpr_at_5pct_fpr"] >= 0.48
    assert fp32["ot"]["tpr_at_5pct_fpr"] - fp32["global"]["tpr_at_5pct_fpr"] >= 0.12
    assert fp32["ot"]["tpr_small_objects"] - fp32["global"]["tpr_small_objects"] >= 0.05
    shipped = fresh_report["fp32_at_shipped_thresholds"]
    assert shipped["ot"]["fpr"] <= 0.082 and shipped["global"]["fpr"] <= 0.096


def _numbers(record, path=()):
    """Every leaf of a JSON record, keyed by its path."""
    if not isinstance(record, dict):
        return {path: record}
    leaves = {}
    for key, value in record.items():
        leaves.update(_numbers(value, (*path, key)))
    return leaves


def test_committed_evaluation_agrees_with_a_fresh_one(fresh_report) -> None:
    """evaluation.json is what evaluate() computes today, figure by figure.

    Same split, seed, image count and thresholds, so every count must match exactly and every
    rate, threshold and cosine within 0.0025 (a decision flipping on two images of 1,000 where
    another CPU rounds differently). The `training` section records how the checkpoint was
    trained, which no evaluation recomputes; its seed and concepts are checked at the source.
    """
    committed = json.loads((ROOT / "evaluation.json").read_text())
    assert committed["thresholds"] == json.loads((ROOT / "thresholds.json").read_text())
    training = committed["training"]
    assert training["seed"] == SEED and training["unsafe_concepts"] == list(UNSAFE_CONCEPTS)
    want = _numbers({k: v for k, v in committed.items() if k not in ("thresholds", "training")})
    got = _numbers(fresh_report)
    assert set(want) == set(got)
    for key, value in want.items():
        if isinstance(value, float):
            assert abs(got[key] - value) <= 0.0025, (key, value, got[key])
        else:
            assert got[key] == value, (key, value, got[key])


def test_detect_default_cli(tmp_path) -> None:
    """`vlmguard detect default IMG --json` works and names the default's categories."""
    scene = make_scene(np.random.default_rng(0), 160, "bomb", small=False, clutter=2)
    path = tmp_path / "bomb.png"
    Image.fromarray(scene.image).save(path)
    result = CliRunner().invoke(detect, ["default", str(path), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)[0]
    names = {c["name"] for c in json.loads((ROOT / "concepts.json").read_text())["categories"]}
    assert {c["name"] for c in record["top_concepts"]} <= names


def test_generator_is_deterministic_and_labels_scenes() -> None:
    """The same seed gives the same scene; small targets cover under 10% of the image."""
    first = sample_scene(np.random.default_rng(3), 96, unsafe=True, small=True)
    second = sample_scene(np.random.default_rng(3), 96, unsafe=True, small=True)
    assert np.array_equal(first.image, second.image) and first.unsafe
    assert 0 < first.area < 0.10
    safe = sample_scene(np.random.default_rng(4), 96, unsafe=False)
    assert not safe.unsafe
