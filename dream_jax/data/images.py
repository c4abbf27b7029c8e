"""Image decoding shared by the ingest converter and the input pipeline.

Every failure is turned into :class:`Skip` with one of the reasons below (never
an exception that escapes, never a substitute image). Policy:

* ``empty_image``        zero-byte image.
* ``corrupt_image``      PIL cannot identify or fully decode the bytes
                         (truncated files included: ``LOAD_TRUNCATED_IMAGES``
                         is never turned on).
* ``decompression_bomb`` width × height > ``max_pixels`` (default: PIL's
                         ``MAX_IMAGE_PIXELS`` = 89,478,485), checked from the
                         header before any pixel is decoded.
* ``too_small``          shorter side < ``min_side``. The pipeline sets
                         ``min_side = ceil(data.min_side_fraction × image_size)``
                         (default fraction 0.75): images between that and
                         ``image_size`` are UPSAMPLED by the ADM crop (bicubic),
                         smaller ones are skipped: a 256-px model should not
                         learn from 40-px thumbnails blown up 6×.

Colour conversion (counted as ``converted/<mode>``, never skipped):
``L``/``1``/``CMYK``/``YCbCr``/``LAB``/``HSV`` → PIL ``convert('RGB')``;
``P`` without transparency → RGB via the palette; images with alpha
(``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparency key)
are composited over WHITE (not PIL's default of dropping alpha, which turns
transparent backgrounds black); 16-bit and 32-bit integer greyscale
(``I;16*``, ``I``) are scaled 65535 → 255 (``round(v / 257)``); float ``F``
is clipped to [0, 255]. EXIF orientation is applied. Animated images use
their first frame.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485          # PIL.Image.MAX_IMAGE_PIXELS default
_ORIENTATION_TAG = 0x0112

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
SKIP_REASONS = ("empty_image", "corrupt_image", "decompression_bomb", "too_small")


class Skip(Exception):
    """A record that cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = ""):
        detail = _ADDRESS.sub("", detail)         # "<_io.BytesIO object at 0x7f..>": keep manifests deterministic
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens (header only) and checks the pixel count. Raises :class:`Skip`."""
    if data is None or len(data) == 0:
        raise Skip("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:     # > 2 × PIL's global limit
        raise Skip("decompression_bomb", str(e)) from None
    except Exception as e:                         # noqa: BLE001  (UnidentifiedImageError, OSError, ...)
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise Skip("corrupt_image", f"size {w}x{h}")
    if max_pixels and w * h > max_pixels:
        raise Skip("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    return img


def load_pixels(img: Image.Image) -> Image.Image:
    """Fully decodes (``img.load()``); truncated/corrupt data → ``Skip('corrupt_image')``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Image.DecompressionBombError as e:
        raise Skip("decompression_bomb", str(e)) from None
    except Exception as e:                         # noqa: BLE001
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None
    return img


def _over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Tuple[Image.Image, Optional[str]]:
    """Returns (RGB image, original mode if a conversion happened else None)."""
    mode = img.mode
    has_transparency = "transparency" in img.info
    if mode == "RGB" and not has_transparency:
        return img, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or has_transparency:
            out = _over_white(img)
        elif mode.startswith("I;16") or mode == "I":
            arr = np.asarray(img).astype(np.int64)
            arr = np.clip(arr, 0, 65535)
            arr = np.round(arr / 257.0).astype(np.uint8)
            out = Image.fromarray(arr, "L").convert("RGB")
        elif mode == "F":
            arr = np.clip(np.nan_to_num(np.asarray(img, np.float32)), 0, 255).round().astype(np.uint8)
            out = Image.fromarray(arr, "L").convert("RGB")
        else:
            out = img.convert("RGB")
    return out, mode


def exif_transpose(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:                              # noqa: BLE001  broken EXIF: keep pixels as stored
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:                              # noqa: BLE001
        return img


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = 0) -> Tuple[Image.Image, Optional[str]]:
    """bytes → fully decoded RGB PIL image (EXIF-oriented) and the converted-from mode.

    Raises :class:`Skip` (``empty_image``, ``corrupt_image``,
    ``decompression_bomb``, ``too_small``). The size check runs on the header
    before decoding, so bombs and thumbnails cost nothing.
    """
    img = open_image(data, max_pixels)
    if min_side and min(img.size) < min_side:
        raise Skip("too_small", f"{img.size[0]}x{img.size[1]} < {min_side}")
    img = load_pixels(img)
    img = exif_transpose(img)
    try:
        return to_rgb(img)
    except Exception as e:                         # noqa: BLE001
        raise Skip("corrupt_image", f"conversion from {img.mode}: {type(e).__name__}: {e}") from None


def adm_center_crop(img: Image.Image, image_size: int) -> np.ndarray:
    """ADM / MAR ``center_crop_arr``: halve with BOX while the shorter side is
    ≥ 2 × size, BICUBIC-resize so the shorter side is ``image_size``, centre
    crop. Returns uint8 [image_size, image_size, 3] (input must be RGB)."""
    while min(*img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    out = arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]
    if out.shape != (image_size, image_size, 3):   # cannot happen for RGB input; guards the contract
        raise Skip("corrupt_image", f"crop produced shape {out.shape}")
    return np.ascontiguousarray(out)


def min_side_for(image_size: int, fraction: float) -> int:
    """Smallest accepted shorter side for a training resolution."""
    return max(1, int(math.ceil(float(fraction) * int(image_size))))
