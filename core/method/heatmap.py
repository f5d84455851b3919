"""Coloured heatmap PNG overlaid on the ROI, with a colour scale tied to the threshold.

The colour scale maps 0 -> blue, the threshold -> the middle of the scale (green-yellow) and
2 x threshold or more -> red, so two pictures of the same ROI are directly comparable. Regions above
the threshold are outlined in white.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_SIDE = 1024  # a heatmap is for a person's eyes: larger ROIs are drawn at this long side


def render_heatmap(rgb: np.ndarray, full_map: np.ndarray, threshold: float, mask: np.ndarray | None = None,
                   alpha: float = 0.45, max_side: int = MAX_SIDE) -> bytes:
    """RGB float image + its anomaly map (same size) -> PNG bytes, at most `max_side` on the long side
    (a 3 MP ROI: 1024 x 768, drawn and encoded in a fraction of the full-size time)."""
    h, w = full_map.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        full_map = cv2.resize(full_map, size, interpolation=cv2.INTER_LINEAR)
        mask = None if mask is None else cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    scale = 2.0 * threshold if threshold > 0 else max(float(full_map.max()), 1e-6)
    norm = np.clip(full_map / scale, 0.0, 1.0)
    colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)  # BGR
    base = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)[:, :, ::-1]
    out = cv2.addWeighted(base, 1.0 - alpha, colour, alpha, 0)
    above = (full_map > threshold) if threshold > 0 else np.zeros(full_map.shape, bool)
    if mask is not None:
        above &= mask
        out[~mask] = (base[~mask] * 0.5).astype(np.uint8)  # outside the mask: dimmed, uncoloured
    if above.any():
        contours, _ = cv2.findContours(above.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, min(out.shape[:2]) // 300))
    # Huffman coding only (no LZ77 matching) of libpng's filtered rows: 12 ms where OpenCV's default took 16.6
    # and level 1 took 21.6 ms for a 512 x 384 heatmap, and the file is 2 % smaller (docs/benchmarks.md)
    ok, png = cv2.imencode(".png", out, [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 BGR image
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def thumbnail(rgb: np.ndarray, full_map: np.ndarray, mask: np.ndarray | None, max_side: int) -> dict:
    """A small copy of an image, its anomaly map and mask, to render a heatmap later (render_heatmap)."""
    h, w = full_map.shape[:2]
    f = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = (np.clip(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), 0, 1) * 255).astype(np.uint8)
    return {"rgb": small, "map": cv2.resize(full_map, size, interpolation=cv2.INTER_AREA).astype(np.float32),
            "mask": None if mask is None else cv2.resize(mask.astype(np.uint8), size,
                                                         interpolation=cv2.INTER_NEAREST) > 0}
