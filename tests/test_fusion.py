"""Branch fusion on numbers: one branch passes through unchanged, scales standardise, and the fused map's
peak is never below the fused score (a flagged image always has a region above the threshold)."""

from __future__ import annotations

import numpy as np
import pytest

from core.method.fusion import BranchScale, fuse_maps, fuse_scores


def test_one_branch_is_unchanged() -> None:
    m = np.random.default_rng(0).random((8, 9)).astype(np.float32)
    s = BranchScale.of([0.4, 0.5, 0.6])
    assert fuse_maps([m], [s]) is m and fuse_scores([0.77], [s]) == 0.77


def test_scores_are_standardised_per_branch_and_expressed_in_the_first_branch_units() -> None:
    fine, coarse = BranchScale(0.5, 0.1), BranchScale(2.0, 1.0)
    assert fuse_scores([0.5, 2.0], [fine, coarse]) == pytest.approx(0.5)  # both at their OK mean
    assert fuse_scores([0.7, 2.0], [fine, coarse]) == pytest.approx(0.6)  # +2 sd in one of two branches
    assert fuse_scores([0.5, 6.0], [fine, coarse]) == pytest.approx(0.7)  # +4 sd in the coarse one


def test_a_spread_that_collapses_is_kept_from_zero() -> None:
    s = BranchScale.of([0.5, 0.5, 0.5])
    assert s.std == pytest.approx(0.025) and BranchScale.of([]).std == 1.0


def test_the_map_peak_is_never_below_the_score() -> None:
    rng = np.random.default_rng(1)
    scales = [BranchScale(0.5, 0.1), BranchScale(1.5, 0.4)]
    for _ in range(200):
        maps = [rng.random((6, 7)).astype(np.float32) * 3 for _ in scales]
        score = fuse_scores([float(m.max()) for m in maps], scales)
        assert fuse_maps(maps, scales).max() >= score - 1e-5
