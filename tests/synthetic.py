"""Deterministic synthetic stand-ins for ../shared/datasets, for a clone that does not have the real images.

A user's clone has no `../shared` (the MVTec images may not be redistributed). Without images, every test
of fitting, scoring, thresholds, regions, the lifecycle and the ingresses would skip and the suite would
say nothing. This module writes the same folder layout with generated images: textured surfaces (a
tread-like RGB surface for `tire`, grey tiles of varying sizes for `magnetic_tile`) and defects with
their masks (cuts, holes, bright contamination; cracks, blowholes, broken edges). Every image follows from
its seed, so a run is reproducible. The defects are plain and strong on purpose: these images test that
the agent's behaviour works, not how well the method detects (that is measured on real images, in
`bench/`). Tests whose assertions only hold for the real images ask for `real_shared`.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

TIRE_KINDS = {"cut": 10, "hole": 10, "contamination": 10, "combined": 5}
TILE_KINDS = {"MT_Crack": 12, "MT_Blowhole": 12, "MT_Break": 12}
MARK = "SYNTHETIC.txt"


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def tread(seed: int, h: int = 512, w: int = 384) -> np.ndarray:
    """A dark rubber-like surface: diagonal tread ribs, slow shading and grain (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = float(rng.uniform(0, 2 * math.pi))
    ribs = np.sin(2 * math.pi * (x * 0.5 + y * 0.866) / 28 + phase)
    gray = 70 + 14 * ribs + 6 * _smooth(rng, h, w, 3) + rng.normal(0, 2.0, (h, w))
    tint = np.array([1.0, 0.97, 0.93], np.float32)
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


def tile_surface(seed: int) -> np.ndarray:
    """A grey ceramic-like tile of a size that varies per image, with faint grinding lines (uint8 gray)."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(200, 260)), int(rng.integers(230, 390))
    y = np.arange(h, dtype=np.float32)[:, None]
    lines = 3 * np.sin(2 * math.pi * y / 9 + float(rng.uniform(0, 6)))
    gray = 115 + lines + 8 * _smooth(rng, h, w, 3) + rng.normal(0, 5, (h, w))
    return np.clip(gray, 0, 255).astype(np.uint8)


def _polyline(rng: np.random.Generator, h: int, w: int, length: float) -> np.ndarray:
    x, y = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    angle, pts = rng.uniform(0, 2 * math.pi), []
    for _ in range(6):
        pts.append((int(x), int(y)))
        angle += rng.uniform(-0.5, 0.5)
        x = float(np.clip(x + math.cos(angle) * length / 5, 2, w - 3))
        y = float(np.clip(y + math.sin(angle) * length / 5, 2, h - 3))
    return np.array(pts, np.int32)


def add_defect(img: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image with the defect, mask uint8 0/255). Kinds: cut, hole, contamination, combined,
    crack, blowhole, break."""
    if kind == "combined":
        img, m1 = add_defect(img, "cut", seed)
        img, m2 = add_defect(img, "hole", seed + 1)
        return img, np.maximum(m1, m2)
    rng = np.random.default_rng(10_000 + seed)
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    out = img.astype(np.int16)
    if kind in ("cut", "crack"):
        thick = 5 if kind == "cut" else 3
        cv2.polylines(mask, [_polyline(rng, h, w, min(h, w) * (0.4 if kind == "cut" else 0.5))], False, 255, thick)
        delta = -55 if kind == "cut" else -60
    elif kind in ("hole", "blowhole"):
        r = int(rng.integers(14, 24)) if kind == "hole" else int(rng.integers(6, 10))
        cx, cy = int(rng.integers(r + 20, w - r - 20)), int(rng.integers(r + 20, h - r - 20))
        cv2.ellipse(mask, (cx, cy), (r, int(r * rng.uniform(0.7, 1.0))), float(rng.uniform(0, 180)), 0, 360, 255, -1)
        delta = -60
    elif kind == "contamination":
        cx, cy, r = int(rng.integers(60, w - 60)), int(rng.integers(60, h - 60)), int(rng.integers(12, 22))
        cv2.ellipse(mask, (cx, cy), (r, int(r * rng.uniform(0.5, 0.9))), float(rng.uniform(0, 180)), 0, 360, 255, -1)
        cv2.circle(mask, (cx + r // 2, cy - r // 3), r // 2, 255, -1)  # not a plain ellipse
        delta = 80
    elif kind == "break":
        corner = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)][int(rng.integers(4))]
        s = int(min(h, w) * rng.uniform(0.2, 0.3))
        tri = np.array([corner, (abs(corner[0] - s), corner[1]), (corner[0], abs(corner[1] - s))], np.int32)
        cv2.fillPoly(mask, [tri], 255)
        delta = -80
    else:
        raise ValueError(f"unknown synthetic defect kind {kind!r}")
    on = mask > 0
    out[on] += delta
    return np.clip(out, 0, 255).astype(np.uint8), mask


def _write(path: Path, img: np.ndarray, quality: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if quality else []
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"could not write {path}")


def make_tire(root: Path) -> None:
    base = root / "mvtec_3d_ad" / "tire"
    for i in range(60):
        _write(base / "train" / "good" / "rgb" / f"{i:03d}.png", tread(i))
    for i in range(20):
        _write(base / "test" / "good" / "rgb" / f"{i:03d}.png", tread(1000 + i))
    for k, (kind, n) in enumerate(TIRE_KINDS.items()):
        for i in range(n):
            seed = 2000 + 100 * k + i
            img, mask = add_defect(tread(seed), kind, seed)
            _write(base / "test" / kind / "rgb" / f"{i:03d}.png", img)
            _write(base / "test" / kind / "gt" / f"{i:03d}.png", mask)


def make_tile(root: Path) -> None:
    base = root / "magnetic_tile"
    for i in range(200):
        img = tile_surface(i)
        _write(base / "MT_Free" / "Imgs" / f"free_{i:03d}.jpg", img, quality=92)
        _write(base / "MT_Free" / "Imgs" / f"free_{i:03d}.png", np.zeros_like(img))
    kinds = {"MT_Crack": "crack", "MT_Blowhole": "blowhole", "MT_Break": "break"}
    for k, (folder, n) in enumerate(TILE_KINDS.items()):
        for i in range(n):
            seed = 5000 + 100 * k + i
            img, mask = add_defect(tile_surface(seed), kinds[folder], seed)
            _write(base / folder / "Imgs" / f"{kinds[folder]}_{i:03d}.jpg", img, quality=92)
            _write(base / folder / "Imgs" / f"{kinds[folder]}_{i:03d}.png", mask)


def make_juice_bottle(root: Path) -> None:
    """A bottle on a dark background (RGB, 256 wide, 512 high): enough for layout, not for LOCO logic."""
    for i in range(10):
        rng = np.random.default_rng(9000 + i)
        img = np.full((512, 256, 3), 20, np.uint8)
        cv2.rectangle(img, (70, 60), (186, 470), (200, 120, 40), -1)
        cv2.rectangle(img, (80, 250), (176, 360), (235, 235, 225), -1)
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        _write(root / "mvtec_loco_ad" / "juice_bottle" / "train" / "good" / f"{i:03d}.png", img)


def make_shared(root: Path) -> Path:
    """Writes `root/datasets/...` in the layout of ../shared/datasets (once; a marker says it is done)."""
    datasets = root / "datasets"
    if (root / MARK).exists():
        return root
    make_tire(datasets)
    make_tile(datasets)
    make_juice_bottle(datasets)
    (root / MARK).write_text("Synthetic images made by tests/synthetic.py; the real data: docs/datasets.md\n")
    return root
