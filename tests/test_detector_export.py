"""Detector graph parity with PyTorch (global cosine 1e-5, OT 1e-4) and bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlmguard.guard_models.concepts import (  # noqa: E402
    ConceptBankError,
    ConceptFileNotFoundError,
    load_concept_bank,
)
from vlmguard.guard_models.detector_export import (  # noqa: E402
    export_detector,
    write_detector_dir,
)
from vlmguard.guard_models.ot_head import OTParams  # noqa: E402
from vlmguard.guard_models.tiny import save_tiny_checkpoint, words_of  # noqa: E402
from vlmguard.guard_models.towers import (  # noqa: E402
    CheckpointNotFoundError,
    UnsupportedCheckpointError,
)
from vlmguard.runtime.detector import (  # noqa: E402
    DetectorNotFoundError,
    SafetyDetector,
    default_detector_dir,
)
from vlmguard.runtime.image_preprocess import ImageInputError  # noqa: E402

torch.set_num_threads(1)

BANK = {
    "categories": [
        {"name": "weapon", "variants": ["a photo of a gun"]},
        {"name": "drugs", "variants": ["a photo of pills", "a syringe with drugs"]},
        {"name": "gore", "variants": ["blood on the floor", "a bloody knife", "a wound"]},
    ]
}
PARAMS = OTParams(epsilon=0.1, iterations=30, entropy_temperature=0.5)


def _write_bank(path, data) -> str:
    """Write concept-bank JSON and return its path."""
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def exported(request, tmp_path_factory):
    """A tiny random checkpoint of each family, exported with the 3-category bank."""
    root = tmp_path_factory.mktemp(request.param)
    words = words_of(v for c in BANK["categories"] for v in c["variants"])
    checkpoint = save_tiny_checkpoint(root / "ckpt", request.param, words, seed=7)
    concepts = _write_bank(root / "concepts.json", BANK)
    manifest = export_detector(str(checkpoint), root / "det", concepts, "none", PARAMS)
    write_detector_dir(manifest, root / "det")
    return request.param, checkpoint, manifest, root / "det"


def _reference(
    family: str, checkpoint, pixel_values: np.ndarray, bank: dict = BANK
) -> dict[str, np.ndarray]:
    """Every detector output computed straightforwardly with the HF model in float64."""
    model = transformers.AutoModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    pixels = torch.from_numpy(pixel_values)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
        if family == "clip":
            patches = model.visual_projection(model.vision_model.post_layernorm(hidden))[:, 1:]
        else:  # the pooling head applied to each patch token on its own
            head = model.vision_model.head
            b, p, d = hidden.shape
            tokens = hidden.reshape(b * p, 1, d)
            pooled = head.attention(head.probe.expand(b * p, 1, d), tokens, tokens)[0]
            patches = (pooled + head.mlp(head.layernorm(pooled))).reshape(b, p, d)
        texts = []
        for category in bank["categories"]:
            if family == "clip":
                enc = tokenizer(category["variants"], padding=True, return_tensors="pt")
            else:
                enc = tokenizer(
                    category["variants"], padding="max_length", max_length=32, return_tensors="pt"
                )
                enc = {"input_ids": enc["input_ids"]}
            texts.append(model.get_text_features(**enc).pooler_output.double())
        scale = model.logit_scale.exp().double()
    image, patches = image.double(), patches.double()
    unit = torch.nn.functional.normalize
    image_n, patch_n = unit(image, dim=-1), unit(patches, dim=-1)
    texts = [unit(t, dim=-1) for t in texts]
    categories = torch.stack([unit(t.mean(0), dim=0) for t in texts])
    cosine = image_n @ categories.T
    probs = torch.softmax(scale * patch_n @ categories.T, dim=-1)
    entropy = -(probs * probs.log()).sum(-1)
    mass = torch.softmax(-entropy / PARAMS.entropy_temperature, dim=-1)  # [B, P]
    ot = torch.zeros(patches.shape[0], patches.shape[1], len(texts), dtype=torch.float64)
    for b in range(patches.shape[0]):
        for c, variants in enumerate(texts):
            cost = 1 - patch_n[b] @ variants.T  # [P, N]
            kernel = torch.exp(-cost / PARAMS.epsilon)
            a = mass[b]
            target = torch.full((variants.shape[0],), 1 / variants.shape[0], dtype=torch.float64)
            v = torch.ones_like(target)
            for _ in range(PARAMS.iterations):
                u = a / (kernel @ v)
                v = target / (kernel.T @ u)
            plan = u[:, None] * kernel * v[None, :]
            ot[b, :, c] = 1 - (plan * cost).sum(1) / plan.sum(1)
    return {
        "det_image_embeds": image.numpy(),
        "det_patch_embeds": patches.numpy(),
        "det_global_cosine": cosine.numpy(),
        "det_patch_mass": mass.numpy(),
        "det_patch_ot_scores": ot.numpy(),
        "det_score_global": cosine.amax(1).numpy(),
        "det_score_ot": ot.amax(dim=(1, 2)).numpy(),
    }


def test_graph_matches_pytorch_reference(exported) -> None:
    """Every output of the ONNX graph matches the straightforward PyTorch computation."""
    family, checkpoint, manifest, det_dir = exported
    detector = SafetyDetector.load(det_dir, variant="fp32")
    side = manifest["inputs"]["pixel_values"]["shape"][2]
    pixels = np.random.default_rng(1).standard_normal((3, 3, side, side)).astype(np.float32)
    got = detector.run(pixels)
    want = _reference(family, checkpoint, pixels)
    np.testing.assert_allclose(got["det_image_embeds"], want["det_image_embeds"], atol=1e-5)
    np.testing.assert_allclose(got["det_patch_embeds"], want["det_patch_embeds"], atol=1e-5)
    for name in ("det_global_cosine", "det_score_global"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
    for name in ("det_patch_mass", "det_patch_ot_scores", "det_score_ot"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0, err_msg=name)
    # The check is not vacuous: OT differs from the plain per-patch best-variant cosine.
    assert np.ptp(got["det_patch_ot_scores"]) > 1e-2


def test_manifest_describes_graph(exported) -> None:
    """The manifest records IO, concepts, OT parameters and thresholds."""
    _, _, manifest, det_dir = exported
    assert manifest["files"] == {"fp32": "onnx/safety_detector.onnx"}
    assert [c["name"] for c in manifest["concepts"]] == ["weapon", "drugs", "gore"]
    assert manifest["outputs"]["det_patch_ot_scores"]["shape"] == ["batch", 16, 3]
    assert manifest["ot"]["epsilon"] == 0.1 and manifest["ot"]["iterations"] == 30
    assert manifest["ot"]["entropy_temperature"] == 0.5
    assert {"global", "ot", "method"} <= set(manifest["thresholds"])
    assert (det_dir / "onnx" / "safety_detector.onnx").is_file()


def test_detect_decides_with_thresholds(exported, tmp_path) -> None:
    """A Detection follows the thresholds and method it is given."""
    _, _, _, det_dir = exported
    image = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    always = SafetyDetector.load(det_dir, thresholds={"ot": -2.0, "method": "ot"})
    never = SafetyDetector.load(det_dir, thresholds={"ot": 2.0, "global": 2.0, "method": "any"})
    hit, miss = always.detect(image, name="x"), never.detect(image, name="x")
    assert hit.unsafe and not miss.unsafe
    assert hit.patch_scores.shape == (4, 4)
    assert hit.top_concepts[0]["ot"] == pytest.approx(hit.score_ot, abs=1e-6)
    assert json.loads(json.dumps(hit.to_json()))["unsafe"] is True


def test_bad_image_gives_clear_error(exported, tmp_path) -> None:
    """A corrupt image raises ImageInputError, never an ONNX Runtime traceback."""
    _, _, _, det_dir = exported
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ImageInputError, match="not a readable image"):
        SafetyDetector.load(det_dir).detect(bad)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"categories": [{"name": "a", "variants": []}]}, "is empty"),
        (
            {"categories": [{"name": "a", "variants": ["x"]}, {"name": "A", "variants": ["y"]}]},
            "duplicate category 'A'",
        ),
        ({"categories": [{"name": "a", "variants": ["x", "x "]}]}, "repeats the variant"),
        ({"categories": []}, "non-empty 'categories'"),
        ({"categories": [{"variants": ["x"]}]}, "non-empty string 'name'"),
    ],
)
def test_bad_concept_files_are_rejected(tmp_path, data, message) -> None:
    """Empty and duplicate categories (and friends) raise ConceptBankError naming the problem."""
    with pytest.raises(ConceptBankError, match=message):
        load_concept_bank(_write_bank(tmp_path / "bank.json", data))


def test_unreadable_concept_files_are_rejected(tmp_path) -> None:
    """Missing files and invalid JSON give one-line errors."""
    with pytest.raises(ConceptFileNotFoundError):
        load_concept_bank(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"categories": [')
    with pytest.raises(ConceptBankError, match="not valid JSON"):
        load_concept_bank(broken)


def test_default_bank_covers_eta_and_mm_safetybench() -> None:
    """The packaged bank has ETA's seven categories and MM-SafetyBench's 13 scenarios."""
    bank = load_concept_bank()
    sources = " ".join(s for c in bank.categories for s in c.sources)
    for eta in (
        "ETA: porn",
        "ETA: violent",
        "ETA: politic",
        "ETA: physical harmful",
        "ETA: illegal",
        "ETA: privacy",
    ):
        assert eta in sources
    assert "unsafe" in bank.names
    for scenario in range(1, 14):
        assert f"MM-SafetyBench: {scenario:02d}-" in sources
    assert all(len(c.variants) >= 2 for c in bank.categories)


def test_missing_or_wrong_checkpoints_are_rejected(tmp_path) -> None:
    """A missing checkpoint or a non-CLIP model gives a one-line error."""
    with pytest.raises(CheckpointNotFoundError, match="not a directory") as err:
        export_detector(str(tmp_path / "nothing-here"), tmp_path / "out", quantize="none")
    assert "hf download" in str(err.value)  # current hub clients install `hf`, not huggingface-cli
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        export_detector(str(tmp_path / "empty"), tmp_path / "out", quantize="none")
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedCheckpointError, match="'bert' checkpoint"):
        export_detector(str(tmp_path / "bert"), tmp_path / "out", quantize="none")


def test_not_a_detector_directory(tmp_path) -> None:
    """Loading a directory that holds no detector says what to run."""
    with pytest.raises(DetectorNotFoundError, match="detector export"):
        SafetyDetector.load(tmp_path)


def test_default_detector_matches_reference(tmp_path) -> None:
    """The trained default detector's graph matches the PyTorch reference too."""
    root = default_detector_dir()
    bank = json.loads((root / "concepts.json").read_text())
    manifest = export_detector("default", tmp_path, quantize="none", params=PARAMS)
    write_detector_dir(manifest, tmp_path)
    assert manifest["source"] == "default"
    assert [c["name"] for c in manifest["concepts"]] == [c["name"] for c in bank["categories"]]
    detector = SafetyDetector.load(tmp_path, variant="fp32")
    side = manifest["inputs"]["pixel_values"]["shape"][2]
    pixels = np.random.default_rng(4).standard_normal((2, 3, side, side)).astype(np.float32)
    got = detector.run(pixels)
    want = _reference("clip", root / "checkpoint", pixels, bank)
    for name in ("det_global_cosine", "det_score_global"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
    for name in ("det_patch_ot_scores", "det_score_ot"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0, err_msg=name)


def test_the_detector_uses_the_one_export_path(exported) -> None:
    """Every variant comes from export_onnx (dynamo): one self-contained file, scoped names."""
    import onnx

    _, _, manifest, out = exported
    assert manifest["exporter"]["exporter"] == "dynamo"
    for name in manifest["files"].values():
        assert not (out / f"{name}_data").exists(), "detector weights stay inline"
        model = onnx.load(str(out / name))
        scopes = {node.name.split("/")[1] for node in model.graph.node if "/" in node.name}
        assert scopes >= {"head", "tower"}
        compute = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "Einsum")]
        assert all("/" in node.name for node in compute), "the quantizer tells head from tower"
