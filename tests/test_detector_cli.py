"""The `detector export` and `detect` click commands, invoked directly with CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

torch = pytest.importorskip("torch")

from vlmguard.guard_models.cli import detect, detector  # noqa: E402
from vlmguard.guard_models.tiny import save_tiny_checkpoint, words_of  # noqa: E402

torch.set_num_threads(1)
BANK = {"categories": [{"name": "weapon", "variants": ["a gun", "a knife"]},
                       {"name": "drugs", "variants": ["pills"]}]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny CLIP exported through the CLI with int8, plus two test images."""
    root = tmp_path_factory.mktemp("cli")
    words = words_of(v for c in BANK["categories"] for v in c["variants"])
    checkpoint = save_tiny_checkpoint(root / "ckpt", "clip", words, seed=11)
    (root / "bank.json").write_text(json.dumps(BANK))
    result = CliRunner().invoke(detector, [
        "export", str(checkpoint), "--out", str(root / "det"),
        "--concepts", str(root / "bank.json"), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / name)
    return root


def test_export_writes_detector_dir(exported) -> None:
    """The export command writes a manifest naming both variants and the concepts."""
    manifest = json.loads((exported / "det" / "detector_config.json").read_text())
    assert set(manifest["files"]) == {"fp32", "int8"}
    assert [c["name"] for c in manifest["concepts"]] == ["weapon", "drugs"]
    assert (exported / "det" / "onnx" / "safety_detector_int8.onnx").is_file()


def test_detect_json(exported) -> None:
    """--json prints one object per image with the promised keys."""
    images = [str(exported / "a.png"), str(exported / "b.jpg")]
    result = CliRunner().invoke(detect, [str(exported / "det"), *images, "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["image"] for r in records] == images
    for record in records:
        assert isinstance(record["unsafe"], bool)
        assert isinstance(record["score_global"], float) and isinstance(record["score_ot"], float)
        assert {c["name"] for c in record["top_concepts"]} == {"weapon", "drugs"}
        assert np.asarray(record["patch_scores"]).shape == (4, 4)


def test_detect_method_and_text_output(exported) -> None:
    """The human output has one line per image and reflects --method."""
    result = CliRunner().invoke(
        detect, [str(exported / "det"), str(exported / "a.png"), "--method", "global"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "method global" in lines[0] and "a.png" in lines[0]


def test_detect_heatmap(exported, tmp_path) -> None:
    """--heatmap writes one PNG per image, upscaled from the model's view."""
    out = tmp_path / "maps" / "heat.png"
    images = [str(exported / "a.png"), str(exported / "b.jpg")]
    result = CliRunner().invoke(
        detect, [str(exported / "det"), *images, "--heatmap", str(out), "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    for index, record in enumerate(records):
        path = tmp_path / "maps" / f"heat_{index}.png"
        assert record["heatmap"] == str(path)
        with Image.open(path) as image:
            assert image.width == 448 and image.height > 448  # with title and colour bar
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
            assert len(np.unique(pixels, axis=0)) > 16  # an actual picture, not a blank
    single = tmp_path / "one.png"
    result = CliRunner().invoke(
        detect, [str(exported / "det"), images[0], "--heatmap", str(single)])
    assert result.exit_code == 0 and single.is_file()


@pytest.mark.parametrize("bad", ["corrupt", "missing"])
def test_detect_bad_image_is_one_line_error(exported, tmp_path, bad: str) -> None:
    """A corrupt or missing image exits 1 with one clear line, no traceback."""
    path = tmp_path / "broken.png"
    if bad == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = CliRunner().invoke(detect, [str(exported / "det"), str(path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("Error:") and len(message.splitlines()) == 1
    assert ("not a readable image" if bad == "corrupt" else "image not found") in message


def test_export_errors_are_one_line(exported, tmp_path) -> None:
    """Unknown quantize modes, bad concept files and missing checkpoints exit 1 with one line."""
    runner = CliRunner()
    (tmp_path / "dup.json").write_text(json.dumps(
        {"categories": [{"name": "x", "variants": ["a"]}, {"name": "x", "variants": ["b"]}]}))
    cases = [
        (["export", str(exported / "ckpt"), "--out", str(tmp_path / "o"), "--quantize", "int3"],
         "unknown quantize mode"),
        (["export", str(exported / "ckpt"), "--out", str(tmp_path / "o"),
          "--concepts", str(tmp_path / "dup.json"), "--quantize", "none"], "duplicate category"),
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not a directory"),
    ]
    for args, message in cases:
        result = runner.invoke(detector, args)
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_detect_on_non_detector_dir(tmp_path) -> None:
    """Pointing detect at an empty directory says how to make a detector."""
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    result = CliRunner().invoke(detect, [str(tmp_path), str(image)])
    assert result.exit_code == 1 and "vlmguard detector export" in result.output


def test_run_time_half_never_imports_torch(exported) -> None:
    """Running `detect` (with a heatmap) imports neither torch nor transformers."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from vlmguard.guard_models.cli import detect\n"
        f"r = CliRunner().invoke(detect, [{str(exported / 'det')!r}, {str(exported / 'a.png')!r},"
        f" '--heatmap', {str(exported / 'h.png')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_detect_reads_a_bundle(exported, detector_bundle, tmp_path) -> None:
    """A bundle with a detector works like a detector dir, after its files are verified."""
    import shutil

    image = str(exported / "a.png")
    result = CliRunner().invoke(detect, [str(detector_bundle), image, "--json"])
    assert result.exit_code == 0, result.output
    direct = CliRunner().invoke(detect, ["default", image, "--json"])
    assert json.loads(result.output)[0]["score_ot"] == json.loads(direct.output)[0]["score_ot"]
    bundle = tmp_path / "bundle"
    shutil.copytree(detector_bundle, bundle)
    graph = bundle / json.loads((bundle / "guard_config.json").read_text())["detector"]["files"][
        "fp32"]  # fmt: skip
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    result = CliRunner().invoke(detect, [str(bundle), image])
    assert result.exit_code == 1 and graph.name in result.output  # a changed byte is refused
    graph.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 1])))  # restored
    plain = json.loads((bundle / "guard_config.json").read_text())
    del plain["detector"]
    (bundle / "guard_config.json").write_text(json.dumps(plain))
    result = CliRunner().invoke(detect, [str(bundle), image])
    assert result.exit_code == 1 and "without a safety detector" in result.output


def test_export_refuses_a_non_empty_out_without_force(exported, tmp_path, caplog) -> None:
    """As `vlmguard export`: a non-empty --out is refused; --force replaces it, quietly."""
    import transformers

    out = tmp_path / "det"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["export", str(exported / "ckpt"), "--out", str(out), "--quantize", "int8"]
    refused = CliRunner().invoke(detector, args)
    assert refused.exit_code == 1
    assert refused.output == f"Error: {out} is not empty; pass --force to replace it\n"
    assert (out / "keep.txt").read_text() == "precious"
    transformers.logging.enable_progress_bar()  # as a fresh process has it
    with caplog.at_level("WARNING"):
        replaced = CliRunner().invoke(detector, [*args, "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists() and (out / "detector_config.json").is_file()
    # nothing the user cannot act on: no progress bars, no quantization advice
    assert replaced.output.count("\n") == 1 and "Loading weights" not in replaced.output
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]


def test_export_qdq_with_calibration_images(exported, tmp_path) -> None:
    """--quantize qdq with --calibration-images writes a QDQ graph that runs."""
    images = tmp_path / "calib"
    images.mkdir()
    rng = np.random.default_rng(1)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            images / f"{index}.png")
    out = tmp_path / "det"
    result = CliRunner().invoke(detector, [
        "export", str(exported / "ckpt"), "--out", str(out), "--quantize", "qdq,fp16",
        "--calibration-images", str(images)])
    assert result.exit_code == 0, result.output
    assert "fp32, qdq, fp16" in result.output
    run = CliRunner().invoke(
        detect, [str(out), str(exported / "a.png"), "--variant", "qdq", "--json"])
    assert run.exit_code == 0, run.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(detector, [
        "export", str(exported / "ckpt"), "--out", str(out), "--quantize", "qdq",
        "--calibration-images", str(empty)])
    assert result.exit_code == 1 and "no images in" in result.output
