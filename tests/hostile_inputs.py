"""A corpus of hostile and broken inputs, generated (no committed binaries): each case says which
outcomes are acceptable: "ok" (decoded and answered) or the error codes a clear rejection may carry."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

OK = "ok"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    filename: str
    expect: frozenset[str]
    mm_per_px: object = None


def _rgb(w: int = 64, h: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    return cv2.imencode(".png", arr)[1].tobytes()


def _pil(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header declaring a huge image, with almost no data: refused from the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(
        b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """64x48 pixels stored, EXIF orientation 6 (rotate 90° clockwise to view): decodes as 48x64."""
    img = Image.fromarray(_rgb(64, 48, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _pil(img, "JPEG", exif=exif.tobytes(), quality=95)


def corpus() -> list[Case]:
    base = _rgb(64, 48)
    big = _rgb(256, 192, 1)
    png, jpg = _png(big), cv2.imencode(".jpg", big)[1].tobytes()
    tif = cv2.imencode(".tiff", big)[1].tobytes()
    float_img = np.random.default_rng(2).random((48, 64), dtype=np.float32)
    float_img[0, :5] = [np.nan, np.inf, -np.inf, -3.0, 7.0]
    palette = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [Image.fromarray(_rgb(64, 48, s)) for s in (4, 5)]
    bad = {"truncated_file", "corrupt_image"}
    cases = [
        Case("png", _png(base), "png.png", frozenset({OK})),
        Case("wrong_extension", _png(base), "wrong_extension.jpg", frozenset({OK})),  # decoded by content
        Case("zero_bytes", b"", "zero_bytes.png", frozenset({"empty_file"})),
        Case("truncated_png", png[: len(png) // 2], "truncated_png.png", frozenset(bad)),
        Case("truncated_jpeg", jpg[: len(jpg) // 3], "truncated_jpeg.jpg", frozenset(bad)),
        Case("truncated_tiff", tif[: len(tif) // 2], "truncated_tiff.tif", frozenset(bad)),
        Case("png_signature_then_garbage", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "garbage.png",
             frozenset(bad)),
        Case("png_bomb_50000x50000", png_bomb(), "bomb.png", frozenset({"too_many_pixels"})),
        Case("tiff_16bit", cv2.imencode(".tiff", (big.astype(np.uint16) * 257))[1].tobytes(), "t16.tif",
             frozenset({OK})),
        Case("tiff_float_nan_inf", _pil(Image.fromarray(float_img, mode="F"), "TIFF"), "float.tif", frozenset({OK})),
        Case("cmyk_jpeg", _pil(Image.fromarray(base).convert("CMYK"), "JPEG"), "cmyk.jpg", frozenset({OK})),
        Case("exif_rotated_jpeg", exif_rotated_jpeg(), "exif.jpg", frozenset({OK})),
        Case("palette_with_transparency", _pil(palette, "PNG"), "palette.png", frozenset({OK})),
        Case("animated_gif", _pil(frames[0], "GIF", save_all=True, append_images=frames[1:]), "anim.gif",
             frozenset({"unknown_format"})),
        Case("multipage_tiff", _pil(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "pages.tif",
             frozenset({OK})),
        Case("one_by_one", _png(_rgb(1, 1)), "one.png", frozenset({"image_too_small"})),
        Case("line_100000x1", _png(_rgb(100_000, 1)), "line.png", frozenset({"image_too_small"})),
        Case("random_bytes", np.random.default_rng(9).bytes(5000), "random.png", frozenset({"unknown_format"})),
        Case("text", b"this is not an image\n", "text.png", frozenset({"unknown_format"})),
        Case("bmp_header_only", b"BM" + b"\0" * 20, "header.bmp", frozenset(bad | {"unknown_format"})),
    ]
    for label, mm in (("nan", float("nan")), ("negative", -0.1), ("zero", 0), ("huge", 1e300), ("inf", "inf"),
                      ("text", "abc"), ("bool", True)):
        cases.append(Case(f"mm_per_px_{label}", _png(base), f"mm_{label}.png", frozenset({"invalid_mm_per_px"}), mm))
    return cases


# ids that must never become paths: (role_id, roi_id) -> rejected with invalid_id
BAD_IDS = [("..", "roi"), ("st1", ".."), ("a/b", "roi"), ("st\x001", "roi"), ("stätion", "roi"), ("st1", "r" * 65),
           (".hidden", "roi"), ("st1", "roi name")]
