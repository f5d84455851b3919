"""The proxy for defects nobody has shown us (core/method/evidence/proxy.py): every kind changes the image inside its
mask and (nearly) nowhere else, is the same for the same seed, and is of the size its kind promises, on
grey and colour images of the repo's own synthetic textures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.method.evidence.proxy import KINDS, make
from tests.synthetic import tread


def _images() -> tuple[np.ndarray, np.ndarray]:
    return tread(0), tread(1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grey", [False, True])
def test_each_kind_changes_the_image_where_its_mask_says(kind: str, grey: bool) -> None:
    img, other = _images()
    if grey:
        img, other = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.cvtColor(other, cv2.COLOR_BGR2GRAY)
    for seed in range(6):
        bad, mask = make(kind, img, other, seed)
        assert bad.shape == img.shape and bad.dtype == np.uint8 and mask.shape == img.shape[:2]
        assert mask.any(), (kind, seed)
        diff = np.abs(bad.astype(np.int16) - img.astype(np.int16))
        diff = diff.max(axis=2) if diff.ndim == 3 else diff
        inside = diff[mask].mean()
        # outside the mask only a feathered rim (blurred edges) may differ, and only a little
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((121, 121), np.uint8)) > 0
        assert diff[~grown].max(initial=0) <= 2, (kind, seed, diff[~grown].max())
        # a low-contrast change is a few percent (on this dark surface ~2 grey levels): inside it still
        # differs far more than outside
        assert inside > 0.5 and inside > 3 * diff[~mask].mean(), (kind, seed, inside, diff[~mask].mean())


def test_the_same_seed_makes_the_same_defect_and_another_seed_another() -> None:
    img, other = _images()
    for kind in KINDS:
        a, ma = make(kind, img, other, 11)
        b, mb = make(kind, img, other, 11)
        c, mc = make(kind, img, other, 12)
        assert np.array_equal(a, b) and np.array_equal(ma, mb)
        assert not np.array_equal(ma, mc), kind


def test_sizes_large_areas_are_large_and_spots_and_scratches_small() -> None:
    img, other = _images()
    share = {k: np.mean([make(k, img, other, s)[1].mean() for s in range(8)]) for k in KINDS}
    assert 0.08 < share["low_contrast"] < 0.45, share
    assert 0.01 < share["foreign_texture"] < 0.15, share
    assert share["spots"] < 0.02 and share["scratch"] < 0.03, share
    assert share["edge_damage"] < 0.05, share
