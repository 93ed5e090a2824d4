"""Image preprocessing for CLIP/SigLIP-style vision towers with numpy and Pillow only.

`preprocess_image` reproduces the Hugging Face image processors' pixel path (the PIL
backend: `CLIPImageProcessorPil`, `SiglipImageProcessorPil` and friends) from the dict in a
bundle's `preprocessor_config.json`: convert to RGB (transparency composited onto white),
resize with the processor's resample filter and size rule, center crop, rescale, normalize,
and return a channels-first float32 batch of one. No torch, no transformers.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray

__all__ = [
    "ImageInput",
    "ImageInputError",
    "ImageFileNotFoundError",
    "ProcessorConfigError",
    "load_rgb_image",
    "model_view",
    "preprocess_image",
    "output_size",
]


class ImageInputError(ValueError):
    """An image the user passed cannot be decoded or has an unsupported layout."""


class ImageFileNotFoundError(FileNotFoundError):
    """An image path the user passed does not exist."""


class ProcessorConfigError(ValueError):
    """A preprocessor_config.json dict uses a size rule or value this module does not support."""


def _describe(image: Any) -> str:
    """Name an image input in an error message without dumping its bytes."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    return f"<{type(image).__name__}>"


def _open_image(source: str | os.PathLike | bytes | bytearray) -> Image.Image:
    """Open and fully decode an image file or encoded bytes, applying its EXIF orientation."""
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageFileNotFoundError(f"image not found: {path}; check the path.")
        data: Any = path
    else:
        data = io.BytesIO(bytes(source))
    try:
        image = Image.open(data)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(
            f"{name} is not a readable image ({error}); pass a PNG, JPEG, WebP or similar file."
        ) from None
    return ImageOps.exif_transpose(image)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a PIL image to an HxWx3 uint8 array, compositing transparency onto white."""
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


def load_rgb_image(image: ImageInput) -> np.ndarray:
    """Load any supported image input as an HxWx3 uint8 RGB array."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = _open_image(image)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ImageInputError("the image is empty (zero width or height).")
        try:
            return _pil_to_rgb(image)
        except (OSError, ValueError) as error:
            raise ImageInputError(f"cannot convert the image to RGB ({error}).") from None
    if isinstance(image, np.ndarray):
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
    """Compute the (height, width) the processor resizes an image of this size to."""
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


def model_view(image: ImageInput, processor_config: dict[str, Any]) -> np.ndarray:
    """The resized, center-cropped HxWx3 uint8 RGB image the model sees (before scaling)."""
    rgb = load_rgb_image(image)
    if processor_config.get("do_resize", True):
        height, width = output_size(rgb.shape[0], rgb.shape[1], processor_config)
        resample = Image.Resampling(int(processor_config.get("resample", 2)))  # 2: bilinear
        resized = Image.fromarray(rgb).resize((width, height), resample=resample)
        rgb = np.asarray(resized, dtype=np.uint8)
    if processor_config.get("do_center_crop", False):
        rgb = _center_crop(rgb, *_crop_size(processor_config))
    return rgb


def preprocess_image(image: ImageInput, processor_config: dict[str, Any]) -> np.ndarray:
    """Turn one image into the (1, 3, H, W) float32 pixel_values a CLIP/SigLIP processor makes."""
    rgb = model_view(image, processor_config)
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
