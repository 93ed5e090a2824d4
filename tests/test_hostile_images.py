"""Hostile images: each is handled as the equivalent RGB image or refused with one clear error.

Covers every Pillow mode, EXIF orientation, animated files, truncated and corrupt files,
non-image bytes, zero-sized and extreme-aspect images and the pixel limit (decompression
bombs), plus property tests over preprocess_image (VLMGUARD_FUZZ=1 runs them long).
"""

from __future__ import annotations

import io
import json
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image
from support import noise_image

from vlmguard.errors import VlmguardError
from vlmguard.runtime.image_preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageFileNotFoundError,
    ImageInputError,
    ImageTooLargeError,
    output_size,
    preprocess_image,
)

transformers = pytest.importorskip("transformers")
from transformers.models.clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.siglip import SiglipImageProcessorPil  # noqa: E402

PROCESSORS = {
    "clip": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36}
    ),
    "siglip": lambda: SiglipImageProcessorPil(size={"height": 32, "width": 32}),
}
# Modes transformers converts (as Pillow's convert("RGB") does, alpha onto white).
PARITY_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                "LAB", "HSV", "I", "F"]  # fmt: skip
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"]


def _config(name: str) -> dict:
    """A processor's dict as a bundle's preprocessor_config.json stores it."""
    return json.loads(PROCESSORS[name]().to_json_string())


def _reference(name: str, image, processor=None) -> np.ndarray:
    """transformers' pixel_values for one image (from PROCESSORS[name] unless given one)."""
    processor = processor or PROCESSORS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(processor(images=image, return_tensors="np")["pixel_values"])


def _in_mode(mode: str, width: int = 53, height: int = 37, seed: int = 0) -> Image.Image:
    """A random image in a Pillow mode (16-bit, 32-bit and float modes span their range)."""
    rng = np.random.default_rng(seed)
    if mode.startswith("I;16"):
        values = rng.integers(0, 65536, (height, width)).astype(">u2" if mode == "I;16B" else "<u2")
        return Image.frombytes(mode, (width, height), values.tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 70000, (height, width)).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.normal(128, 100, (height, width)).astype(np.float32), "F")
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    """An image encoded in a file format."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (its data is 8 x 8)."""
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def _refused(image, config: dict, error=ImageInputError, **kwargs) -> str:
    """The one-line message preprocess_image refuses `image` with."""
    with pytest.raises(error) as info:
        preprocess_image(image, config, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, VlmguardError)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def _valid(pixels: np.ndarray, config: dict) -> None:
    """pixel_values of one image: float32, finite, [1, 3, H, W] at the crop size if any."""
    assert pixels.dtype == np.float32 and pixels.ndim == 4 and pixels.shape[:2] == (1, 3)
    assert np.isfinite(pixels).all()
    if config.get("do_center_crop"):
        crop = config["crop_size"]
        assert pixels.shape[2:] == (crop["height"], crop["width"])


# ------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("mode", PARITY_MODES)
def test_every_mode_matches_transformers(name: str, mode: str) -> None:
    """Each Pillow mode transformers accepts gives its pixel_values within 1e-5."""
    image = _in_mode(mode)
    assert image.mode == mode
    expected = _reference(name, image)
    np.testing.assert_allclose(preprocess_image(image, _config(name)), expected, atol=1e-5)


def test_premultiplied_alpha_is_read_as_straight_alpha() -> None:
    """'La' (which transformers cannot convert) is read as the same image in 'LA'."""
    image = _in_mode("La")
    straight = image.convert("LA")
    got = preprocess_image(image, _config("clip"))
    np.testing.assert_allclose(got, _reference("clip", straight), atol=1e-5)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_grayscale_keeps_its_high_byte(mode: str, tmp_path) -> None:
    """16-bit grayscale is the 8-bit image of its high byte (transformers clips it at 255)."""
    image = _in_mode(mode)
    high = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    config = _config("siglip")
    expected = preprocess_image(high, config)
    np.testing.assert_array_equal(preprocess_image(image, config), expected)
    if mode != "I;16L":  # PNG writes I;16 and I;16B: 16-bit grayscale files read back so
        path = tmp_path / "gray16.png"
        image.save(path)
        with Image.open(path) as opened:
            assert opened.mode.startswith("I;16")
        np.testing.assert_array_equal(preprocess_image(path, config), expected)
    order = ">u2" if mode == "I;16B" else "<u2"
    mid_gray = Image.frombytes(mode, (4, 4), np.full(16, 32768, order).tobytes())
    plain = {"do_resize": False, "do_normalize": False, "do_rescale": False}
    assert (preprocess_image(mid_gray, plain) == 128).all()  # not saturated at 255


def test_unconvertible_pil_images_are_refused() -> None:
    """A PIL image that cannot be decoded or converted raises one ImageInputError line."""
    lazy = Image.open(io.BytesIO(_encode(noise_image(0), "PNG")[:300]))  # truncated, not loaded
    assert "cannot convert the" in _refused(lazy, _config("clip"))


# ------------------------------------------------------------------------ EXIF and animation

_UNDO = {  # orientation -> the transpose that stores an upright image under that tag
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image(tmp_path, orientation: int) -> None:
    """Paths, bytes and PIL images with any EXIF orientation give the image as displayed."""
    upright = noise_image(orientation, (24, 16))
    stored = upright.transpose(_UNDO[orientation]) if orientation in _UNDO else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    config = {"do_resize": False, "do_normalize": False}
    expected = preprocess_image(upright, config)
    assert expected.shape == (1, 3, 16, 24)
    with Image.open(path) as opened:
        for image in (path, path.read_bytes(), opened):
            np.testing.assert_array_equal(preprocess_image(image, config), expected)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored() -> None:
    """An unknown orientation or unparsable EXIF leaves the stored pixels as they are."""
    image = noise_image(3, (20, 12))
    config = {"do_resize": False, "do_normalize": False}
    expected = preprocess_image(image, config)
    exif = Image.Exif()
    exif[0x0112] = 9
    odd = Image.open(io.BytesIO(_encode(image, "PNG", exif=exif)))
    np.testing.assert_array_equal(preprocess_image(odd, config), expected)
    garbage = image.copy()
    garbage.info["exif"] = b"Exif\x00\x00MM\x00*\xff\xff\xff\xff"
    np.testing.assert_array_equal(preprocess_image(garbage, config), expected)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_files_give_their_first_frame(fmt: str) -> None:
    """An animated GIF, APNG or WebP is read as its first frame."""
    frames = [Image.new("RGB", (30, 20), color) for color in ("red", "lime", "blue")]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)
    opened = Image.open(io.BytesIO(data))
    assert getattr(opened, "n_frames", 1) == 3
    config = {"do_resize": False, "do_normalize": False, "do_rescale": False}
    got = preprocess_image(data, config)
    assert got.shape == (1, 3, 20, 30)
    np.testing.assert_array_equal(got[0, :, 0, 0], [255, 0, 0])
    np.testing.assert_array_equal(preprocess_image(opened, config), got)


# ------------------------------------------------------------------- corrupt and non-images


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_are_refused(tmp_path, fmt: str) -> None:
    """A file cut at 10%, 50% or 90% raises one ImageInputError line, as bytes or as a path."""
    data = _encode(noise_image(1, (64, 48)), fmt)
    config = _config("clip")
    for fraction in (0.1, 0.5, 0.9):
        cut = data[: int(len(data) * fraction)]
        assert "not a readable image" in _refused(cut, config)
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(cut)
        assert str(path) in _refused(path, config)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 64, b"hello, world", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
     b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
     b"\x89PNG\r\n\x1a\n" + b"\xff" * 40, b"\xff\xd8\xff\xe0" + b"\x00" * 40,
     bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))],
    ids=["empty", "zeros", "text", "pdf", "svg", "png-magic", "jpeg-magic", "random"],
)  # fmt: skip
def test_non_image_bytes_are_refused(data: bytes) -> None:
    """Bytes that are no image raise one ImageInputError line naming their length."""
    message = _refused(data, _config("siglip"))
    assert f"<{len(data)} bytes>" in message and "not a readable image" in message
    _refused(bytearray(data), _config("siglip"))


def test_bad_paths_and_objects_are_refused(tmp_path) -> None:
    """Missing paths, directories, text files and non-image objects each get one clear line."""
    config = _config("clip")
    assert "image not found" in _refused(tmp_path / "missing.jpg", config, ImageFileNotFoundError)
    assert "not a regular file" in _refused(tmp_path, config)
    notes = tmp_path / "notes.jpg"
    notes.write_text("just text")
    assert "not a readable image" in _refused(str(notes), config)
    for thing in (None, 42, 1.5, [1, 2, 3], {"image": "x"}, object()):
        assert "unsupported image input" in _refused(thing, config)
    for array in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8),
                  np.zeros((1, 8, 8, 3), np.uint8), np.zeros(8, np.uint8)):  # fmt: skip
        assert "numpy images" in _refused(array, config)


@pytest.mark.parametrize(
    "image",
    [Image.new("RGB", (0, 0)), Image.new("RGB", (0, 7)), Image.new("L", (7, 0)),
     np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8), np.zeros((0, 0, 4), np.uint8),
     _png_claiming(0, 5), _png_claiming(5, 0)],
    ids=["pil-0x0", "pil-0x7", "pil-7x0", "array-0x5", "array-5x0", "array-0x0", "png-0x5",
         "png-5x0"],
)  # fmt: skip
def test_zero_sized_images_are_refused(image) -> None:
    """Images with no pixels raise one ImageInputError line."""
    _refused(image, _config("clip"))


# ----------------------------------------------------------------- aspect ratio and size


def test_extreme_aspect_ratios_are_handled_or_refused() -> None:
    """Thin images resize as transformers does, unless the size rule would blow them up."""
    thin = noise_image(2, (3, 2000))
    for name in ("clip", "siglip"):  # 40 x 26,666 before the crop; 32 x 32 directly
        for image in (thin, thin.transpose(Image.Transpose.TRANSPOSE)):
            expected = _reference(name, image)
            np.testing.assert_allclose(preprocess_image(image, _config(name)), expected, atol=1e-5)
    line = noise_image(3, (10000, 1))
    clip_224 = json.loads(CLIPImageProcessorPil().to_json_string())
    message = _refused(line, clip_224, ImageTooLargeError)
    assert "less extreme aspect ratio" in message and "2240000x224" in message
    siglip_224 = SiglipImageProcessorPil()  # a fixed size: no blow-up, parity holds
    expected = _reference("", line, siglip_224)
    got = preprocess_image(line, json.loads(siglip_224.to_json_string()))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    short_long = {"size": {"shortest_edge": 48, "longest_edge": 64}, "do_normalize": False}
    assert output_size(1, 2000, short_long) == (1, 64)  # transformers resizes to 0 and fails
    _valid(preprocess_image(line.crop((0, 0, 2000, 1)), short_long, None), short_long)


def test_pixel_limit_applies_to_every_input_kind(tmp_path) -> None:
    """max_pixels refuses larger images however they come, and None lifts it."""
    image = noise_image(4, (100, 80))
    path = tmp_path / "image.png"
    image.save(path)
    config = _config("clip")
    for source in (path, path.read_bytes(), image, np.asarray(image)):
        message = _refused(source, config, ImageTooLargeError, max_pixels=7999)
        assert "8,000 pixels, over the limit of 7,999" in message and "max_image_pixels" in message
        _valid(preprocess_image(source, config, max_pixels=8000), config)
        _valid(preprocess_image(source, config, max_pixels=None), config)
    assert DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    for bad in (0, -1, 1.5, True, "100"):
        with pytest.raises(ValueError, match="max_pixels"):
            preprocess_image(image, config, max_pixels=bad)


@pytest.mark.parametrize(
    "data,size",
    [(_png_claiming(10_000, 10_000), "10000x10000"), (_png_claiming(30_000, 30_000), "more than"),
     (_png_claiming(100_000, 100_000), "more than")],
    ids=["png-100M", "png-900M", "png-10G"],
)  # fmt: skip
def test_decompression_bombs_are_refused_before_decoding(data: bytes, size: str) -> None:
    """Headers claiming huge images are refused at once, silently, leaving Pillow's limit alone."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = _refused(data, _config("clip"), ImageTooLargeError)
    assert time.perf_counter() - started < 1.0
    assert size in message and f"over the limit of {DEFAULT_MAX_IMAGE_PIXELS:,}" in message
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_gif_bomb_is_refused() -> None:
    """A GIF whose screen claims 65535 x 65535 pixels is refused before decoding."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    _refused(bytes(data), _config("clip"), ImageTooLargeError)


def test_pillow_limit_is_named_when_it_is_the_one_refusing(monkeypatch) -> None:
    """With max_pixels=None, only Pillow's own (2x MAX_IMAGE_PIXELS) limit can refuse."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    config = _config("siglip")
    big = _encode(noise_image(5, (50, 50)), "PNG")  # 2,500 > 2 x 1,000
    assert "PIL.Image.MAX_IMAGE_PIXELS" in _refused(
        big, config, ImageTooLargeError, max_pixels=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # between 1x and 2x Pillow's limit: no warning leaks
        _valid(preprocess_image(_encode(noise_image(5, (40, 40)), "PNG"), config, None), config)


# ------------------------------------------------------------------------------ end to end


def test_guarded_vlm_applies_its_pixel_limit_and_refuses_bad_images(tiny_setup) -> None:
    """GuardedVLM.load(max_image_pixels=...) refuses before any model runs; odd modes answer."""
    from vlmguard.runtime.guarded_vlm import GuardedVLM
    from vlmguard.runtime.policy import GuardPolicy

    bundle = tiny_setup("clip", "llama").bundles["plain"]
    strict = GuardedVLM.load(
        bundle, providers="cpu", policy=GuardPolicy.neutral(), max_image_pixels=1000
    )
    with pytest.raises(ImageTooLargeError, match="over the limit of 1,000"):
        strict.generate(noise_image(0, (40, 30)), "What is this?", max_new_tokens=2)
    vlm = GuardedVLM.load(bundle, providers="cpu", policy=GuardPolicy.neutral())
    with pytest.raises(ImageInputError, match="not a readable image"):
        vlm.generate(_encode(noise_image(0), "JPEG")[:100], "What is this?", max_new_tokens=2)
    rgb = noise_image(6, (40, 30))
    want = vlm.generate(rgb, "What is this?", max_new_tokens=3).token_ids
    assert len(want) == 3
    for odd in (rgb.convert("RGBA"), rgb.convert("RGBX"), _encode(rgb, "PNG")):
        assert vlm.generate(odd, "What is this?", max_new_tokens=3).token_ids == want
    assert vlm.generate(rgb.convert("CMYK"), "What is this?", max_new_tokens=3).token_ids


def test_cli_takes_a_pixel_limit(tiny_setup, tmp_path) -> None:
    """`vlmguard run --max-image-pixels N` refuses larger images in one line; 0 lifts the limit."""
    from click.testing import CliRunner

    from vlmguard.cli import main

    bundle = tiny_setup("clip", "llama").bundles["plain"]
    path = tmp_path / "image.png"
    noise_image(8, (40, 30)).save(path)
    args = ["run", str(bundle), "--image", str(path), "--prompt", "Hi?", "--providers", "cpu"]
    result = CliRunner().invoke(main, [*args, "--max-image-pixels", "1000"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert "1,200 pixels, over the limit of 1,000" in lines[0]
    for limit in ("0", "1344"):  # 1,344: the 42 x 32 the size rule resizes it to
        extra = ["--max-image-pixels", limit, "--max-new-tokens", "2"]
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------ properties

CONFIGS = [
    _config("clip"),
    _config("siglip"),
    {"size": {"shortest_edge": 24, "longest_edge": 40}, "do_center_crop": False,
     "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
]  # fmt: skip
FUZZ_LIMIT = 2_000_000  # mutated headers may claim big images: keep each decode cheap
SIDES = st.integers(1, 64) | st.integers(1, 4) | st.integers(200, 600)


@st.composite
def arrays(draw) -> np.ndarray:
    """uint8 arrays HxW or HxWx{1,3,4}, thin and square, noisy or flat."""
    height, width = draw(SIDES), draw(SIDES)
    shape = (height, width) + draw(st.sampled_from([(), (1,), (3,), (4,)]))
    seed = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return np.full(shape, draw(st.integers(0, 255)), np.uint8)


@given(arrays(), st.sampled_from(CONFIGS))
def test_property_arrays_give_valid_pixels(array: np.ndarray, config: dict) -> None:
    """Any uint8 image array gives finite float32 [1, 3, H, W] pixel_values of the right size."""
    pixels = preprocess_image(array, config)
    _valid(pixels, config)
    if not config.get("do_center_crop"):
        assert pixels.shape[2:] == output_size(array.shape[0], array.shape[1], config)


@given(arrays(), st.sampled_from(PARITY_MODES + ["La", "I;16", "I;16B"]), st.sampled_from(CONFIGS))
def test_property_every_mode_gives_valid_pixels(array: np.ndarray, mode: str, config) -> None:
    """A random image in any Pillow mode gives valid pixel_values."""
    rgb = np.atleast_3d(array)[..., :1].repeat(3, axis=-1)
    if mode.startswith("I;16"):
        values = rgb[..., 0].astype("<u2") * 257
        image = Image.frombytes(mode, rgb.shape[1::-1], values.astype(
            ">u2" if mode == "I;16B" else "<u2").tobytes())  # fmt: skip
    else:
        image = Image.fromarray(rgb).convert(mode)
    _valid(preprocess_image(image, config), config)


@st.composite
def mutated_files(draw) -> bytes:
    """A small image encoded in a common format, then truncated, overwritten or spliced."""
    fmt = draw(st.sampled_from(FORMATS))
    mode = "RGBA" if fmt in ("PNG", "WEBP", "TIFF") and draw(st.booleans()) else "RGB"
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    data = bytearray(_encode(noise_image(draw(st.integers(0, 99)), size).convert(mode), fmt))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        if action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif data and position < len(data):
            data[position] = draw(st.integers(0, 255)) if action == "flip" else 0
    return bytes(data)


@pytest.mark.filterwarnings("ignore")
@given(mutated_files() | st.binary(max_size=600), st.sampled_from(CONFIGS))
def test_property_corrupt_bytes_are_read_or_refused_cleanly(data: bytes, config: dict) -> None:
    """Mutated image files and random bytes give valid pixels or one ImageInputError line."""
    try:
        pixels = preprocess_image(data, config, max_pixels=FUZZ_LIMIT)
    except ImageInputError as error:
        message = str(error)
        assert message and "\n" not in message
        event(f"refused: {type(error).__name__}")
        return
    _valid(pixels, config)
    event("read")
