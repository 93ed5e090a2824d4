"""Image preprocessing for CLIP/SigLIP-style vision towers with numpy and Pillow only.

`preprocess_image` reproduces the Hugging Face image processors' pixel path (the PIL
backend: `CLIPImageProcessorPil`, `SiglipImageProcessorPil` and friends) from the dict in a
bundle's `preprocessor_config.json`: convert to RGB (transparency composited onto white),
resize with the processor's resample filter and size rule, center crop, rescale, normalize,
and return a channels-first float32 batch of one. No torch, no transformers.

Hostile inputs end in one `ImageInputError` line (never a Pillow traceback) or are handled as
the equivalent RGB image: files and bytes are refused past a pixel limit before they are
decoded (`max_pixels`, default `DEFAULT_MAX_IMAGE_PIXELS`), as is any image the size rule would
blow up past it (an extreme aspect ratio); animated files give their first frame; the EXIF
orientation is applied to files, bytes and PIL images alike; 16-bit grayscale keeps its high
byte (transformers clips it at 255 instead); every other Pillow mode converts as transformers
converts it.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmguard.errors import BundleError, UsageError, VlmguardError

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray

# Pillow's own default warning threshold (about 9459 x 9459): the same images a default Pillow
# warns about are refused here unless the caller raises the limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageInput",
    "ImageInputError",
    "ImageFileNotFoundError",
    "ImageTooLargeError",
    "ProcessorConfigError",
    "load_rgb_image",
    "model_view",
    "preprocess_image",
    "output_size",
]


class ImageInputError(VlmguardError, ValueError):
    """An image the user passed cannot be decoded or has an unsupported layout."""


class ImageTooLargeError(ImageInputError):
    """An image (or what the size rule would resize it to) has more pixels than the limit."""


class ImageFileNotFoundError(VlmguardError, FileNotFoundError):
    """An image path the user passed does not exist."""


class ProcessorConfigError(BundleError, ValueError):
    """A preprocessor_config.json dict uses a size rule or value this module does not support."""


def _describe(image: Any) -> str:
    """Name an image input in an error message without dumping its bytes."""
    if isinstance(image, (str, os.PathLike)):
        text = str(image)
        return text if text.isprintable() else repr(text)  # one line, whatever the name holds
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    return f"<{type(image).__name__}>"


def _reason(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def _check_limit(max_pixels: int | None) -> None:
    """Refuse a pixel limit that is not a positive int or None."""
    if max_pixels is not None and (
        isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
    ):
        raise UsageError(f"max_pixels must be a positive int or None, not {max_pixels!r}")


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image of width x height past the limit, or an empty one."""
    if width < 1 or height < 1:
        raise ImageInputError(f"{name} is empty ({width}x{height} pixels); pass a non-empty image.")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} has {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; downscale it, or raise the limit (max_image_pixels)."
        )


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")  # a scheme of 2+ letters: not C:/


def _url(source: str | os.PathLike) -> str | None:
    """The URL a path argument spells (`https://...`, which pathlib folds to `https:/...`)."""
    match = _URL.match(os.fspath(source))
    return f"{match.group(1)}://{match.group(2)}" if match else None


def _open_image(
    source: str | os.PathLike | bytes | bytearray, max_pixels: int | None
) -> Image.Image:
    """Open an image file or encoded bytes, check its size, then decode its first frame."""
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            url = _url(source)
            if url is not None:
                raise ImageFileNotFoundError(
                    f"{url} is a URL: vlmguard does not fetch images; download the image first "
                    "(e.g. curl -LO URL) and pass the local file."
                )
            raise ImageFileNotFoundError(f"image not found: {name}; check the path.")
        if not path.is_file():
            raise ImageInputError(f"{name} is not a regular file; pass an image file.")
        data: Any = path
    else:
        data = io.BytesIO(bytes(source))
    try:
        with warnings.catch_warnings():  # the size is judged below, against max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(data)
    except Image.DecompressionBombError:  # over twice Pillow's own limit
        pillow = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if max_pixels is not None and max_pixels <= pillow:
            raise ImageTooLargeError(
                f"{name} has more than {pillow:,} pixels, over the limit of {max_pixels:,}; "
                "downscale it, or raise the limit (max_image_pixels)."
            ) from None
        raise ImageTooLargeError(
            f"{name} has more than {pillow:,} pixels, over Pillow's own limit; raise "
            "PIL.Image.MAX_IMAGE_PIXELS as well as max_image_pixels to accept it."
        ) from None
    except UnidentifiedImageError:
        raise ImageInputError(
            f"{name} is not a readable image (no image format Pillow knows); "
            "pass a PNG, JPEG, WebP or similar file."
        ) from None
    except Exception as error:  # Pillow raises many types on hostile bytes
        raise ImageInputError(
            f"{name} is not a readable image ({_reason(error)}); "
            "pass a PNG, JPEG, WebP or similar file."
        ) from None
    try:
        _check_pixels(name, image.width, image.height, max_pixels)
        image.load()  # the first frame of an animated file
    except ImageInputError:
        image.close()
        raise
    except Exception as error:  # truncated or corrupt data, in any of Pillow's forms
        image.close()
        raise ImageInputError(
            f"{name} is not a readable image ({_reason(error)}); "
            "pass a complete PNG, JPEG, WebP or similar file."
        ) from None
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, as a viewer shows the image; broken EXIF is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: the pixels are still fine, keep them as stored
        return image


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a PIL image to an HxWx3 uint8 array, compositing transparency onto white."""
    if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte, as for 16-bit RGB
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    elif image.mode == "La":  # premultiplied alpha: transformers refuses it, Pillow converts it
        image = image.convert("LA")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Convert an HxW or HxWx{1,3,4} uint8 array to HxWx3 uint8, alpha composited onto white."""
    if array.dtype != np.uint8:
        raise ImageInputError(
            f"numpy images must be uint8 in [0, 255], got dtype {array.dtype}; "
            "convert with (x * 255).round().astype(np.uint8)."
        )
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ImageInputError(
            f"numpy images must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}."
        )
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return np.ascontiguousarray(array)


def _image_to_rgb(image: Image.Image, max_pixels: int | None) -> np.ndarray:
    """Check a PIL image's size, then turn it upright and into an HxWx3 uint8 RGB array."""
    _check_pixels("the image", image.width, image.height, max_pixels)
    try:
        return _pil_to_rgb(_upright(image))
    except Exception as error:  # an unconvertible mode, or a lazy image that fails to load
        raise ImageInputError(
            f"cannot convert the {image.mode} image to RGB ({_reason(error)}); "
            "convert it to RGB first."
        ) from None


def load_rgb_image(
    image: ImageInput, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Load any supported image input as an HxWx3 uint8 RGB array (None: no pixel limit)."""
    _check_limit(max_pixels)
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        with _open_image(image, max_pixels) as opened:  # closes the file, animated ones too
            return _image_to_rgb(opened, max_pixels)
    if isinstance(image, Image.Image):
        return _image_to_rgb(image, max_pixels)
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3):
            _check_pixels("the array image", image.shape[1], image.shape[0], max_pixels)
        return _array_to_rgb(image)
    raise ImageInputError(
        f"unsupported image input {_describe(image)}; pass a path, encoded bytes, "
        "a PIL image or a uint8 numpy array."
    )


def _size_rule(config: dict[str, Any]) -> dict[str, int]:
    """Normalise the processor's `size` entry to a dict of size keys."""
    size = config.get("size")
    if size is None:
        raise ProcessorConfigError("preprocessor config has do_resize but no 'size'.")
    if isinstance(size, int):
        # transformers' get_size_dict: an int means a square unless default_to_square is False.
        if config.get("default_to_square", True):
            return {"height": size, "width": size}
        return {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        return {key: int(value) for key, value in size.items() if value is not None}
    raise ProcessorConfigError(f"unsupported 'size' in preprocessor config: {size!r}.")


def output_size(height: int, width: int, config: dict[str, Any]) -> tuple[int, int]:
    """Compute the (height, width) the processor resizes an image of this size to (each >= 1)."""
    new_height, new_width = _rule_size(height, width, config)
    return max(1, new_height), max(1, new_width)  # an extreme aspect ratio may round to 0


def _rule_size(height: int, width: int, config: dict[str, Any]) -> tuple[int, int]:
    """The processor's size rule applied to an image of this size."""
    size = _size_rule(config)
    if "shortest_edge" in size and "longest_edge" in size:
        return _shortest_longest(height, width, size["shortest_edge"], size["longest_edge"])
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        target = size["shortest_edge"]
        new_short, new_long = target, int(target * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise ProcessorConfigError(
        f"unsupported 'size' keys {sorted(size)}; expected shortest_edge or height/width."
    )


def _shortest_longest(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """Size rule for shortest_edge plus longest_edge (transformers' get_size_with_aspect_ratio)."""
    raw = None
    if max(height, width) / min(height, width) * shortest > longest:
        raw = longest * min(height, width) / max(height, width)
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    scale = raw if raw is not None else shortest
    if width < height:
        return int(scale * height / width), shortest
    return shortest, int(scale * width / height)


def _center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Center crop an HxWxC array, zero-padding first where it is smaller than the crop."""
    height, width = image.shape[:2]
    if height < crop_h or width < crop_w:
        new_h, new_w = max(crop_h, height), max(crop_w, width)
        padded = np.zeros((new_h, new_w, image.shape[2]), dtype=image.dtype)
        top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
        padded[top_pad : top_pad + height, left_pad : left_pad + width] = image
        image, height, width = padded, new_h, new_w
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[top : top + crop_h, left : left + crop_w]


def _crop_size(config: dict[str, Any]) -> tuple[int, int]:
    """Read the processor's crop size as (height, width)."""
    crop = config.get("crop_size")
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    raise ProcessorConfigError(f"unsupported 'crop_size' in preprocessor config: {crop!r}.")


def model_view(
    image: ImageInput,
    processor_config: dict[str, Any],
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """The resized, center-cropped HxWx3 uint8 RGB image the model sees (before scaling)."""
    rgb = load_rgb_image(image, max_pixels)
    if processor_config.get("do_resize", True):
        height, width = output_size(rgb.shape[0], rgb.shape[1], processor_config)
        if max_pixels is not None and height * width > max_pixels:
            raise ImageTooLargeError(
                f"the processor's size rule would resize this {rgb.shape[1]}x{rgb.shape[0]} "
                f"image to {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,}; crop it to a less extreme aspect ratio, or raise the limit "
                "(max_image_pixels)."
            )
        resample = Image.Resampling(int(processor_config.get("resample", 2)))  # 2: bilinear
        resized = Image.fromarray(rgb).resize((width, height), resample=resample)
        rgb = np.asarray(resized, dtype=np.uint8)
    if processor_config.get("do_center_crop", False):
        rgb = _center_crop(rgb, *_crop_size(processor_config))
    return rgb


def preprocess_image(
    image: ImageInput,
    processor_config: dict[str, Any],
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Turn one image into the (1, 3, H, W) float32 pixel_values a CLIP/SigLIP processor makes.

    Images with more than `max_pixels` pixels (None: no limit), or that the size rule would
    resize past it, raise ImageTooLargeError; files and bytes are checked before decoding.
    """
    rgb = model_view(image, processor_config, max_pixels)
    pixels = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    if processor_config.get("do_rescale", True):
        scale = float(processor_config.get("rescale_factor", 1 / 255))
        pixels = (pixels.astype(np.float64) * scale).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if processor_config.get("do_normalize", True):
        mean = _channel_values(processor_config, "image_mean")
        std = _channel_values(processor_config, "image_std")
        pixels = (pixels - mean[:, None, None]) / std[:, None, None]
    return pixels[None].astype(np.float32, copy=False)


def _channel_values(config: dict[str, Any], key: str) -> np.ndarray:
    """Read a per-channel mean or std (a scalar is broadcast to three channels) as float32."""
    value = config.get(key)
    if value is None:
        raise ProcessorConfigError(f"preprocessor config has do_normalize but no '{key}'.")
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ProcessorConfigError(f"'{key}' must have 3 values, got {len(values)}.")
    return np.asarray(values, dtype=np.float32)
