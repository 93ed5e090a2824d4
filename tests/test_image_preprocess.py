"""preprocess_image must match the Hugging Face CLIP/SigLIP image processors (PIL backend)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmguard.runtime.image_preprocess import (
    ImageFileNotFoundError,
    ImageInputError,
    ProcessorConfigError,
    preprocess_image,
)

transformers = pytest.importorskip("transformers")
from transformers.models.clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.siglip import SiglipImageProcessorPil  # noqa: E402

PROCESSORS = {
    "clip-default": lambda: CLIPImageProcessorPil(),
    "clip-small-crop": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36}, resample=2
    ),
    "clip-pad": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 20}, crop_size={"height": 32, "width": 32}
    ),
    "clip-short-long": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 48, "longest_edge": 64}, do_center_crop=False
    ),
    "siglip-default": lambda: SiglipImageProcessorPil(),
    "siglip-384": lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}),
}


def _config(processor) -> dict:
    """Round-trip a processor through preprocessor_config.json as a bundle stores it."""
    return json.loads(processor.to_json_string())


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Build a random image in the given PIL mode."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3])
    if mode == "RGBA":
        return Image.fromarray(rgba)
    if mode == "L":
        return Image.fromarray(rgba[..., 0])
    if mode == "LA":
        return Image.fromarray(rgba[..., :2].copy(), mode="LA")
    if mode == "P":
        return Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P-transparent":
        image = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 5
        return image
    raise AssertionError(mode)


def _reference(processor, image) -> np.ndarray:
    """The Hugging Face processor's pixel_values for one image."""
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize(
    "mode,size",
    [
        ("RGB", (640, 480)),
        ("RGBA", (300, 301)),
        ("L", (31, 200)),
        ("P", (257, 64)),
        ("P-transparent", (100, 100)),
        ("LA", (50, 90)),
        ("RGB", (7, 5)),
    ],
)
def test_matches_hf_processor_for_pil_images(name: str, mode: str, size: tuple[int, int]) -> None:
    """PIL inputs of several modes and sizes match the HF processor within 1e-5."""
    processor = PROCESSORS[name]()
    image = _random_image(mode, *size, seed=zlib.crc32(f"{mode}{size}".encode()))
    expected = _reference(processor, image)
    got = preprocess_image(image, _config(processor))
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["clip-default", "siglip-default"])
def test_paths_bytes_and_arrays_match(tmp_path, name: str) -> None:
    """Paths, encoded bytes and uint8 arrays (HxW, HxWx3, HxWx4) give the processor's output."""
    processor = PROCESSORS[name]()
    config = _config(processor)
    image = _random_image("RGBA", 123, 77, seed=3)
    path = tmp_path / "image.png"
    image.save(path)
    expected = _reference(processor, Image.open(path))
    np.testing.assert_allclose(preprocess_image(path, config), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(preprocess_image(str(path), config), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        preprocess_image(path.read_bytes(), config), expected, atol=1e-5, rtol=0
    )
    rgba = np.asarray(image)
    for array in (rgba, rgba[..., :3], rgba[..., :1]):
        expected = _reference(processor, array)
        np.testing.assert_allclose(preprocess_image(array, config), expected, atol=1e-5, rtol=0)
    gray = np.ascontiguousarray(rgba[..., 0])
    np.testing.assert_allclose(
        preprocess_image(gray, config), _reference(processor, gray[..., None]), atol=1e-5, rtol=0
    )


def test_exif_orientation_is_applied(tmp_path) -> None:
    """A JPEG with an EXIF rotation is read upright, as transformers' load_image does."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    config = {"do_resize": False, "do_rescale": True, "do_normalize": False}
    assert preprocess_image(path, config).shape == (1, 3, 40, 20)


def test_corrupt_and_missing_files_give_clear_errors(tmp_path) -> None:
    """Non-image and truncated files raise ImageInputError; missing ones FileNotFoundError."""
    config = _config(PROCESSORS["clip-default"]())
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageInputError, match="not a readable image"):
        preprocess_image(text, config)
    buffer = io.BytesIO()
    _random_image("RGB", 64, 64, seed=1).save(buffer, format="PNG")
    with pytest.raises(ImageInputError, match="not a readable image"):
        preprocess_image(buffer.getvalue()[:200], config)
    with pytest.raises(ImageFileNotFoundError, match="image not found"):
        preprocess_image(tmp_path / "missing.png", config)
    assert issubclass(ImageFileNotFoundError, FileNotFoundError)
    assert issubclass(ImageInputError, ValueError)


@pytest.mark.parametrize(
    "given", ["https://example.com/cat.png", Path("https://example.com/cat.png"), "s3://b/k.jpg"]
)
def test_a_url_is_not_fetched_and_says_so(given) -> None:
    """A URL (pathlib folds its // to /, as click's Path does) is named as a URL, not a path."""
    config = _config(PROCESSORS["clip-default"]())
    with pytest.raises(ImageFileNotFoundError, match="is a URL: vlmguard does not fetch") as err:
        preprocess_image(given, config)
    assert "://" in str(err.value) and "download the image first" in str(err.value)
    with pytest.raises(ImageFileNotFoundError, match="image not found"):
        preprocess_image("C:/no/such/image.png", config)  # a drive letter is not a scheme


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8, 3), dtype=np.float32),
        np.zeros((8, 8, 2), dtype=np.uint8),
        np.zeros((2, 8, 8, 3), dtype=np.uint8),
        42,
        Image.new("RGB", (0, 0)),
    ],
)
def test_unsupported_inputs_are_rejected(bad) -> None:
    """Arrays of the wrong dtype/shape, empty images and non-images raise ImageInputError."""
    with pytest.raises(ImageInputError):
        preprocess_image(bad, {"size": {"height": 8, "width": 8}})


def test_unsupported_size_rule_is_rejected() -> None:
    """A size dict without a supported rule raises ProcessorConfigError."""
    with pytest.raises(ProcessorConfigError, match="size"):
        preprocess_image(np.zeros((8, 8, 3), np.uint8), {"size": {"max_height": 4}})


def test_module_does_not_import_torch_or_transformers() -> None:
    """Importing and running the preprocessing never pulls in torch or transformers."""
    code = (
        "import sys, numpy as np\n"
        "from vlmguard.runtime.image_preprocess import preprocess_image\n"
        "config = {'size': {'height': 4, 'width': 4}, 'do_normalize': False}\n"
        "preprocess_image(np.zeros((9, 9, 3), np.uint8), config)\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
