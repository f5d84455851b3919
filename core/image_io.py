"""Image intake: decode by content, validate, convert to RGB float in [0, 1], downscale huge images.

Conversion rules (documented in docs/protocol.md):
- 8-bit samples are divided by 255, 16-bit samples by 65535 (full range, no auto-contrast);
  float TIFFs are clipped to [0, 1].
- Grayscale is replicated to three channels; palette images are expanded to RGB.
- An alpha channel is composited over black (a fully transparent pixel becomes black), so that
  transparent regions look the same on every image of a ROI.
- An EXIF orientation other than 1 is applied (the image is inspected as a viewer shows it); NaN
  samples of float images become 0, +inf 1.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import InputError

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_DECODE_PIXELS = 100_000_000  # decompression-bomb limit: refuse before decoding
DEFAULT_MAX_PIXELS = 12_000_000  # above this the image is downscaled (area interpolation)
DEFAULT_MAX_DECODED_BYTES = 400_000_000  # pixels x channels x bytes per sample, from the header
DEFAULT_MIN_SIDE = 14  # one ViT patch
ORIENTATION_TAG = 0x0112
MAX_MM_PER_PX = 1000.0  # 1 m per pixel: anything larger is a unit mistake (and would overflow areas in mm²)


@dataclass
class ImageInput:
    """A decoded, validated ROI image ready for a backbone."""

    rgb: np.ndarray  # H x W x 3 float32 in [0, 1]
    mm_per_px: float | None  # effective scale after any downscale
    scale: float  # applied downscale factor (1.0 = untouched)
    original_size: tuple[int, int]  # (width, height) as received
    format: str
    bit_depth: int
    geometry: float = 1.0  # reported pixels per decoded pixel (> 1: a JPEG decoded at 1/2, 1/4 or 1/8 scale)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def reported_size(self) -> tuple[int, int]:
        """(w, h) that results speak in: the image as received (after any max_pixels downscale)."""
        w, h = self.size
        return (round(w * self.geometry), round(h * self.geometry)) if self.geometry != 1.0 else (w, h)


def validate_mm_per_px(value: object) -> float | None:
    """None passes (unknown scale); otherwise a finite number > 0."""
    if value is None:
        return None
    try:
        if not isinstance(value, (int, float, str)):
            raise TypeError(type(value).__name__)
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"mm_per_px must be a number, got {value!r}", code="invalid_mm_per_px") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0 or number > MAX_MM_PER_PX:
        raise InputError(f"mm_per_px must be a finite number > 0 and <= {MAX_MM_PER_PX:g}, got {value!r}",
                         code="invalid_mm_per_px")
    return number


MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
         (b"BM", "BMP"))


def magic_format(data: bytes) -> str | None:
    """The accepted format whose signature `data` starts with, or None."""
    return next((fmt for sig, fmt in MAGIC if data.startswith(sig)), None)


def _png_bit_depth(data: bytes) -> int:
    # IHDR is the first chunk: 8-byte signature, length, type, width, height, bit depth.
    return data[24] if len(data) > 24 else 8


def decoded_bytes(data: bytes, fmt: str, pil: Image.Image) -> int:
    """What decoding will hold, from the header only: pixels x channels x bytes per sample (a 16-bit PNG
    or TIFF holds two bytes per sample, where Pillow's mode may say one)."""
    width, height = pil.size
    channels = len(pil.getbands())
    if pil.mode in ("I", "F", "I;32"):
        per_sample = 4
    elif pil.mode.startswith("I;16"):
        per_sample = 2
    elif fmt == "PNG":
        per_sample = max(1, _png_bit_depth(data) // 8)
    elif fmt == "TIFF":
        bits = getattr(pil, "tag_v2", {}).get(258, (8,))
        per_sample = max(1, max(bits if isinstance(bits, tuple) else (bits,)) // 8)
    else:
        per_sample = 1
    return width * height * channels * per_sample


def _to_float_rgb(arr: np.ndarray, bgr: bool) -> np.ndarray:
    """uint8/uint16/float array of shape HxW, HxWx2, HxWx3 or HxWx4 -> HxWx3 float32 in [0, 1]."""
    if arr.dtype == np.uint8:  # one pass into float32 (astype then divide took 13x longer here)
        f = np.multiply(arr, np.float32(1 / 255), dtype=np.float32)
    elif arr.dtype == np.uint16:
        f = np.multiply(arr, np.float32(1 / 65535), dtype=np.float32)
    elif arr.dtype in (np.float32, np.float64):  # NaN -> 0, +inf -> 1: one bad pixel must not poison the map
        f = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    else:
        raise InputError(f"unsupported sample type {arr.dtype}", code="unsupported_image")
    if f.ndim == 2:
        return np.repeat(f[:, :, None], 3, axis=2)
    channels = f.shape[2]
    if channels == 1:
        return np.repeat(f, 3, axis=2)
    if channels == 2:  # gray + alpha
        return np.repeat(f[:, :, :1] * f[:, :, 1:2], 3, axis=2)
    color, alpha = f[:, :, :3], (f[:, :, 3:4] if channels == 4 else None)
    if bgr:
        color = color[:, :, ::-1]
    if alpha is not None:
        color = color * alpha
    return np.ascontiguousarray(color, dtype=np.float32)


def _decode_pixels(data: bytes, fmt: str, pil: Image.Image) -> tuple[np.ndarray, int]:
    needs_cv2 = fmt == "TIFF" or (fmt == "PNG" and _png_bit_depth(data) == 16 and pil.mode not in ("I;16", "I"))
    if needs_cv2:  # Pillow reduces 16-bit colour to 8 bits; OpenCV keeps it
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
        if arr is None:
            raise InputError(f"{fmt} data could not be decoded (truncated or corrupt)", code="corrupt_image")
        depth = 16 if arr.dtype == np.uint16 else (32 if arr.dtype.kind == "f" else 8)
        return _to_float_rgb(arr, bgr=arr.ndim == 3), depth
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pil.load()
    if pil.getexif().get(ORIENTATION_TAG, 1) != 1:  # a camera's EXIF rotation: inspect what a viewer shows
        pil = ImageOps.exif_transpose(pil)
    mode = pil.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        raw = np.asarray(pil)
        arr = raw.astype(np.uint16) if mode != "I" or raw.max(initial=0) > 255 else raw.astype(np.uint8)
        return _to_float_rgb(arr, bgr=False), 16 if arr.dtype == np.uint16 else 8
    if mode == "P":
        pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
    elif mode == "1":
        pil = pil.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        pil = pil.convert("RGB")
    elif mode == "F":
        return _to_float_rgb(np.asarray(pil, dtype=np.float32), bgr=False), 32
    return _to_float_rgb(np.asarray(pil), bgr=False), 8


def decode_image(
    data: bytes,
    *,
    mm_per_px: object = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    draft_for: Callable[[int, int], tuple[int, int]] | None = None,
) -> ImageInput:
    """Decode image bytes by content into an `ImageInput`, or raise `InputError` with a specific code.

    draft_for(w, h) -> the backbone input (w, h) the image will be resized to: a JPEG at least twice as
    large is decoded in the DCT domain at 1/2, 1/4 or 1/8 scale, never below that input (libjpeg's
    scaled decode: a 3 MP ROI for a ~320² input costs a fraction of a full decode). Results still speak in
    the image's own pixels (`geometry`), and mm_per_px is unchanged.
    """
    mm = validate_mm_per_px(mm_per_px)
    pil = _open_checked(data, max_bytes, max_decode_pixels, min_side, max_decoded_bytes)
    width, height = pil.size
    fmt = pil.format or "unknown"
    drafted = False
    if fmt == "JPEG" and draft_for is not None:
        iw, ih = draft_for(width, height)
        if width >= 2 * iw and height >= 2 * ih and pil.getexif().get(ORIENTATION_TAG, 1) in (1, 3):
            pil.draft(pil.mode, (iw, ih))  # picks the largest reduction that stays >= (iw, ih)
            drafted = pil.size[0] < width
    try:
        rgb, depth = _decode_pixels(data, fmt, pil)
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombWarning) as exc:
        code = "truncated_file" if "truncated" in str(exc).lower() else "corrupt_image"
        raise InputError(f"{fmt} data could not be decoded: {exc}", code=code) from None
    scale = 1.0
    decoded_w = rgb.shape[1]
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
        if not drafted or decoded_w > new_w:  # not already smaller from a scaled JPEG decode
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
        scale = new_w / width
        if mm is not None:
            mm = mm / scale
    geometry = width * scale / rgb.shape[1] if drafted else 1.0
    return ImageInput(rgb=rgb, mm_per_px=mm, scale=scale, original_size=(width, height), format=fmt, bit_depth=depth,
                      geometry=geometry)


def _open_checked(data: bytes, max_bytes: int, max_decode_pixels: int, min_side: int,
                  max_decoded_bytes: int) -> Image.Image:
    """Open by content and check every limit from the header, before any pixel is decoded."""
    if len(data) == 0:
        raise InputError("the file is empty (0 bytes)", code="empty_file")
    if len(data) > max_bytes:
        raise InputError(f"the file has {len(data)} bytes, over the limit of {max_bytes}", code="file_too_large")
    try:
        pil = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, beyond ours: refused from the header
        raise InputError(f"image declares too many pixels: {exc}", code="too_many_pixels") from None
    except UnidentifiedImageError:
        magic = magic_format(data)
        if magic:  # the signature of an accepted format, but no readable header after it
            raise InputError(f"{magic} signature but the header cannot be read (corrupt or truncated)",
                             code="corrupt_image") from None
        raise InputError(
            "unknown image format: expected PNG, JPEG, BMP or TIFF content", code="unknown_format"
        ) from None
    except (OSError, SyntaxError, struct.error, ValueError) as exc:
        raise InputError(f"image header could not be read: {exc}", code="corrupt_image") from None
    width, height = pil.size
    fmt = pil.format or "unknown"
    if width * height > max_decode_pixels:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels, over the decode limit of {max_decode_pixels}",
            code="too_many_pixels",
        )
    held = decoded_bytes(data, fmt, pil)
    if held > max_decoded_bytes:
        raise InputError(f"image is {width}x{height} with {len(pil.getbands())} channels: {held} bytes once decoded, "
                         f"over the limit of {max_decoded_bytes} (limits.max_decoded_bytes)", code="too_many_bytes")
    if min(width, height) < min_side:
        raise InputError(
            f"image is {width}x{height}, smaller than one {min_side}-pixel patch", code="image_too_small"
        )
    return pil
