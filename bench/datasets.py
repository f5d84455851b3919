"""Deterministic splits of the real datasets in ../shared/datasets (see ../shared/README.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


def shared_root() -> Path:
    env = os.environ.get("ANOMALY_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


@dataclass
class Split:
    name: str
    train: list[Path]
    test: list[tuple[Path, int, Path | None]]  # image, label (1 = defect), mask path


def load_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    if path is None or not path.exists():
        return np.zeros((size[1], size[0]), bool)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if (m.shape[1], m.shape[0]) != size:
        m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
    return m > 127


def magnetic_tile(root: Path) -> Split:
    base = root / "datasets" / "magnetic_tile"
    free = sorted((base / "MT_Free" / "Imgs").glob("*.jpg"))
    test = [(p, 0, p.with_suffix(".png")) for p in free[100:]]
    for cls in ("MT_Blowhole", "MT_Break", "MT_Crack"):
        test += [(p, 1, p.with_suffix(".png")) for p in sorted((base / cls / "Imgs").glob("*.jpg"))]
    return Split("magnetic_tile", free[:100], test)


def tire(root: Path) -> Split:
    base = root / "datasets" / "mvtec_3d_ad" / "tire"
    train = sorted((base / "train" / "good" / "rgb").glob("*.png"))
    test = []
    for d in sorted((base / "test").iterdir()):
        for p in sorted((d / "rgb").glob("*.png")):
            test.append((p, int(d.name != "good"), d / "gt" / p.name))
    return Split("tire", train, test)


def juice_bottle(root: Path) -> Split:
    base = root / "datasets" / "mvtec_loco_ad" / "juice_bottle"
    good = sorted((base / "train" / "good").glob("*.png"))
    test = [(p, 0, None) for p in good[30:]]
    test += [(p, 1, base / "ground_truth" / "logical_anomalies" / p.name)
             for p in sorted((base / "test" / "logical_anomalies").glob("*.png"))]
    return Split("juice_bottle", good[:30], test)


SPLITS = {"magnetic_tile": magnetic_tile, "tire": tire, "juice_bottle": juice_bottle}


def halves(split: Split) -> tuple[Split, Split]:
    """(validation, test): the test images of each folder alternate between the two, in sorted order.
    Settings are chosen on the validation half and reported on the test half."""
    val, test, seen = [], [], {}
    for item in split.test:
        folder = item[0].parent
        n = seen[folder] = seen.get(folder, -1) + 1
        (val if n % 2 == 0 else test).append(item)
    return Split(split.name + ":val", split.train, val), Split(split.name + ":test", split.train, test)


def defect_kinds(split: Split) -> np.ndarray:
    """Each test image's defect class (its folder), "good" for the good ones."""
    return np.array([(p.parent.parent if p.parent.name in ("Imgs", "rgb") else p.parent).name if lab else "good"
                     for p, lab, _ in split.test])


def labelled_draw(kinds: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(test images drawn as labelled NG samples: k per defect class, at least one of each class left out;
    every other test image), one random draw per seed."""
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(kinds == c), min(k, (kinds == c).sum() - 1), replace=False)
                             for c in sorted(set(kinds) - {"good"})])
    return chosen, np.setdiff1d(np.arange(len(kinds)), chosen)
