"""Image intake: decoding by content, conversion rules, every rejection code, downscaling."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import InputError
from core.image_io import decode_image, validate_mm_per_px


def encode(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt, **kw) if mode else Image.fromarray(arr).save(
        buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(h: int = 64, w: int = 80) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], axis=2).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_rgb_roundtrip(fmt: str) -> None:
    rgb = gradient()
    img = decode_image(encode(rgb, fmt))
    assert img.format == fmt and img.rgb.shape == (64, 80, 3) and img.rgb.dtype == np.float32
    np.testing.assert_allclose(img.rgb, rgb / 255.0, atol=1e-6)


def test_jpeg_is_decoded_by_content_not_name(tmp_path) -> None:
    data = encode(gradient(), "JPEG", quality=95)
    img = decode_image(data)
    assert img.format == "JPEG"
    assert np.abs(img.rgb - gradient() / 255.0).mean() < 0.02


def test_grayscale_is_replicated() -> None:
    g = gradient()[:, :, 0]
    img = decode_image(encode(g, "PNG"))
    assert np.allclose(img.rgb[:, :, 0], img.rgb[:, :, 2]) and np.allclose(img.rgb[:, :, 0], g / 255.0)


def test_16bit_gray_png_keeps_precision() -> None:
    g = (np.arange(64 * 80).reshape(64, 80) * 12).astype(np.uint16)
    ok, png = cv2.imencode(".png", g)
    img = decode_image(png.tobytes())
    assert img.bit_depth == 16
    np.testing.assert_allclose(img.rgb[:, :, 1], g / 65535.0, atol=1e-6)


def test_16bit_rgb_png_and_tiff_keep_precision_and_channel_order() -> None:
    rgb16 = (gradient().astype(np.uint16) * 257 + 3)
    for ext in (".png", ".tiff"):
        ok, data = cv2.imencode(ext, rgb16[:, :, ::-1].copy())  # cv2 writes BGR
        img = decode_image(data.tobytes())
        assert img.bit_depth == 16, ext
        np.testing.assert_allclose(img.rgb, rgb16 / 65535.0, atol=1e-6)


def test_alpha_is_composited_over_black() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :16, 3] = 255
    rgba[:, 16:, 3] = 0
    img = decode_image(encode(rgba, "PNG"))
    assert np.allclose(img.rgb[:, :16], 200 / 255.0) and np.allclose(img.rgb[:, 16:], 0.0)


def test_palette_image_expands_to_rgb() -> None:
    pil = Image.fromarray(gradient()).convert("P", palette=Image.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    expected = np.asarray(pil.convert("RGB")) / 255.0
    np.testing.assert_allclose(img.rgb, expected, atol=1e-6)


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty_file"),
        (b"hello, this is not an image at all" * 4, "unknown_format"),
        (b"GIF89a" + b"\0" * 100, "unknown_format"),
    ],
)
def test_rejections_by_content(data: bytes, code: str) -> None:
    with pytest.raises(InputError) as exc:
        decode_image(data)
    assert exc.value.code == code and exc.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_rejected(fmt: str) -> None:
    data = encode(gradient(256, 256), fmt)
    with pytest.raises(InputError) as exc:
        decode_image(data[: len(data) // 2])
    assert exc.value.code in ("truncated_file", "corrupt_image")


def test_byte_limit() -> None:
    data = encode(gradient(), "PNG")
    with pytest.raises(InputError) as exc:
        decode_image(data, max_bytes=len(data) - 1)
    assert exc.value.code == "file_too_large"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A tiny PNG claiming 20000 x 20000 pixels: refused from the header alone.
    data = encode(np.zeros((20000, 20), np.uint8), "PNG")
    with pytest.raises(InputError) as exc:
        decode_image(data, max_decode_pixels=100_000)
    assert exc.value.code == "too_many_pixels"


def test_image_smaller_than_one_patch() -> None:
    with pytest.raises(InputError) as exc:
        decode_image(encode(gradient(10, 40), "PNG"), min_side=14)
    assert exc.value.code == "image_too_small"


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "abc", True])
def test_invalid_mm_per_px(bad: object) -> None:
    with pytest.raises(InputError) as exc:
        decode_image(encode(gradient(), "PNG"), mm_per_px=bad)
    assert exc.value.code == "invalid_mm_per_px"


def test_mm_per_px_accepts_numbers_and_none() -> None:
    assert validate_mm_per_px(None) is None and validate_mm_per_px("0.05") == 0.05


def test_large_image_is_downscaled_and_mm_per_px_follows() -> None:
    big = np.full((3000, 4000, 3), 128, np.uint8)  # 12 MP
    data = encode(big, "PNG")
    img = decode_image(data, mm_per_px=0.02, max_pixels=3_000_000)
    w, h = img.size
    assert w * h <= 3_000_000 and abs(w / h - 4 / 3) < 0.01
    assert math.isclose(img.scale, w / 4000) and math.isclose(img.mm_per_px, 0.02 / img.scale)
    assert img.original_size == (4000, 3000)


def test_roi_of_2_to_4_mp_passes_untouched() -> None:
    arr = np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)  # 3 MP
    img = decode_image(encode(arr, "PNG"), mm_per_px=0.05)
    assert img.size == (2000, 1500) and img.scale == 1.0 and img.mm_per_px == 0.05
    np.testing.assert_allclose(img.rgb, arr / 255.0, atol=1e-6)


def _jpeg(w: int, h: int, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(3)
    arr = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if orientation is None:
        img.save(buf, format="JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_but_reported_in_its_own_pixels() -> None:
    def input_size(w: int, h: int) -> tuple[int, int]:
        return 368, 272  # a ~320² backbone input

    img = decode_image(_jpeg(2048, 1536), mm_per_px=0.05, draft_for=input_size)
    assert img.size == (512, 384) and img.geometry == 4.0  # the DCT-domain 1/4 decode, never below the input
    assert img.reported_size == (2048, 1536) and img.original_size == (2048, 1536)
    assert img.mm_per_px == 0.05 and img.scale == 1.0  # the caller's geometry is unchanged
    full = decode_image(_jpeg(2048, 1536))
    small = cv2.resize(full.rgb, (512, 384), interpolation=cv2.INTER_AREA)
    assert np.abs(small - img.rgb).mean() < 0.02  # the same picture as a full decode, then an area resize
    # not reduced: a JPEG under twice the input, a PNG, a JPEG a viewer shows rotated by 90 degrees
    assert decode_image(_jpeg(600, 500), draft_for=input_size).geometry == 1.0
    rotated = decode_image(_jpeg(2048, 1536, orientation=6), draft_for=input_size)
    assert rotated.size == (1536, 2048) and rotated.geometry == 1.0
