"""Synthetic defects made from held-out OK images: a proxy for the defect kinds nobody has shown us.

Used to *choose settings* (bench/proxy_eval.py reports how its ranking of settings agrees with the real
defects' ranking; bench/self_tune.py whether a ROI could pick its own branch set from them), never to
learn features: methods trained on synthetic defects score worst on this
kind of surface in published benchmarks (DRAEM 0.78, CutPaste 0.83 on Magnetic Tile, IM-IAD).

Five kinds, each deterministic from its seed, each with its pixel mask:
- `low_contrast`: a large smooth area (Perlin-like noise, thresholded and feathered) whose gain, gamma
  or sharpness changes by a few percent: the large, low-contrast change of a surface;
- `foreign_texture`: a patch of another OK image at another orientation and scale, feathered in;
- `spots`: a few small dark or bright spots;
- `scratch`: a thin polyline, darker or brighter;
- `edge_damage`: a chipped piece at the border of the part (darkened, noisy).
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("low_contrast", "foreign_texture", "spots", "scratch", "edge_damage")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: random values on a coarse grid, cubic-upsampled (a cheap Perlin stand-in)."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def _blob(rng: np.random.Generator, h: int, w: int, area: float) -> np.ndarray:
    """A smooth, connected-ish mask covering about `area` of the image (feathered float in [0, 1])."""
    noise = _smooth_noise(rng, h, w, int(rng.integers(2, 5)))
    cut = np.quantile(noise, 1 - area)
    hard = (noise >= cut).astype(np.float32)
    k = max(3, (min(h, w) // 20) | 1)
    return cv2.GaussianBlur(hard, (k, k), 0)


def _channels(weights: np.ndarray, img: np.ndarray) -> np.ndarray:
    """An HxW weight map shaped to multiply `img` (HxW grey or HxWxC colour)."""
    return weights[..., None] if img.ndim == 3 else weights


def low_contrast(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    soft = _channels(_blob(rng, h, w, float(rng.uniform(0.15, 0.35))), img)
    f = img.astype(np.float32) / 255
    how = rng.integers(3)
    if how == 0:
        changed = f * float(rng.choice([0.88, 1.12]))
    elif how == 1:
        changed = f ** float(rng.choice([0.85, 1.18]))
    else:
        changed = cv2.GaussianBlur(f, (0, 0), sigmaX=float(rng.uniform(1.5, 3.0)))
        changed = changed.reshape(f.shape)
    out = f * (1 - soft) + changed * soft
    return np.clip(out * 255, 0, 255).astype(np.uint8), soft.reshape(h, w) > 0.5


def foreign_texture(img: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    ph, pw = int(h * rng.uniform(0.15, 0.35)), int(w * rng.uniform(0.15, 0.35))
    src = cv2.resize(other, (w, h))
    scale = float(rng.uniform(0.5, 1.6))
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(30, 150)), scale)
    src = cv2.warpAffine(src, rot, (w, h), borderMode=cv2.BORDER_REFLECT)
    y, x = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    mask = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (x + pw // 2, y + ph // 2), (pw // 2, ph // 2), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    soft = _channels(cv2.GaussianBlur(mask, (0, 0), sigmaX=max(1.0, min(ph, pw) / 12)), img)
    out = img.astype(np.float32) * (1 - soft) + src.astype(np.float32).reshape(img.shape) * soft
    return out.astype(np.uint8), soft.reshape(h, w) > 0.5


def spots(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        r = max(2, int(min(h, w) * rng.uniform(0.01, 0.03)))
        c = (int(rng.integers(r, w - r)), int(rng.integers(r, h - r)))
        one = np.zeros((h, w), np.uint8)
        cv2.circle(one, c, r, 1, -1)
        delta = float(rng.choice([-1, 1]) * rng.uniform(50, 110))
        soft = cv2.GaussianBlur(one.astype(np.float32), (0, 0), sigmaX=max(0.8, r / 3)).reshape(h, w, *(
            (1,) if img.ndim == 3 else ()))
        out = out + delta * soft
        mask |= one
    return np.clip(out, 0, 255).astype(np.uint8), mask > 0


def scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    pts = [(int(rng.integers(0, w)), int(rng.integers(0, h)))]
    for _ in range(int(rng.integers(2, 5))):
        x, y = pts[-1]
        step = min(h, w) * rng.uniform(0.1, 0.25)
        ang = rng.uniform(0, 2 * np.pi)
        pts.append((int(np.clip(x + step * np.cos(ang), 0, w - 1)), int(np.clip(y + step * np.sin(ang), 0, h - 1))))
    mask = np.zeros((h, w), np.uint8)
    cv2.polylines(mask, [np.array(pts, np.int32)], False, 1, int(rng.integers(1, 4)))
    delta = float(rng.choice([-1, 1]) * rng.uniform(40, 90))
    out = img.astype(np.float32) + delta * mask.reshape(h, w, *((1,) if img.ndim == 3 else ()))
    return np.clip(out, 0, 255).astype(np.uint8), mask > 0


def edge_damage(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    side = int(rng.integers(4))
    size = int(min(h, w) * rng.uniform(0.06, 0.15))
    mask = np.zeros((h, w), np.uint8)
    along = int(rng.integers(size, (w if side in (0, 2) else h) - size))
    centre = {0: (along, 0), 1: (w - 1, along), 2: (along, h - 1), 3: (0, along)}[side]
    cv2.ellipse(mask, centre, (size, int(size * rng.uniform(0.5, 1.0))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    out = img.astype(np.float32)
    noise = rng.normal(0, 12, img.shape).astype(np.float32)
    m = mask.reshape(h, w, *((1,) if img.ndim == 3 else ())).astype(np.float32)
    out = out * (1 - m) + (out * 0.35 + noise) * m
    return np.clip(out, 0, 255).astype(np.uint8), mask > 0


def make(kind: str, img: np.ndarray, other: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect of `kind` on `img` (uint8, HxW or HxWx3); `other`: another OK image."""
    rng = np.random.default_rng(seed)
    if kind == "foreign_texture":
        return foreign_texture(img, other, rng)
    return {"low_contrast": low_contrast, "spots": spots, "scratch": scratch, "edge_damage": edge_damage}[kind](
        img, rng)
