"""MemoryBank on random vectors: size targets, every sample represented, pruning of redundancy."""

from __future__ import annotations

import numpy as np

from core.method.coreset import project, sq_dists
from core.method.memory_bank import CoresetSize, MemoryBank


def unit(rng: np.random.Generator, n: int, d: int = 32) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bank_follows_its_size_target_and_keeps_every_sample() -> None:
    rng = np.random.default_rng(0)
    size = CoresetSize(ratio=0.1, minimum=300, maximum=600)
    bank = MemoryBank(32, size, proj_dim=16)
    total = 0
    for _ in range(40):
        feats = unit(rng, 100)
        bank.extend(feats, total, total + 100)
        total += 100
        target = size.target(total)
        assert len(bank) <= min(target + max(1, target // 20), size.maximum), (total, len(bank))
        assert len(bank) >= min(total, target) - 1
    assert len(bank) <= 600
    owners = bank.owners(np.arange(0, total, 100))
    assert set(np.unique(owners)) == set(range(40))  # no sample crowded out
    assert np.array_equal(np.sort(bank.rows), np.unique(bank.rows)) and bank.rows.max() < total
    assert bank.feats.shape == (len(bank), 32)


def test_bank_features_are_the_rows_it_names() -> None:
    rng = np.random.default_rng(1)
    data = unit(rng, 3000)
    bank = MemoryBank(32, CoresetSize(0.1, 200, 400), proj_dim=16)
    for lo in range(0, 3000, 150):
        bank.extend(data[lo : lo + 150], lo, lo + 150)
    np.testing.assert_array_equal(bank.feats.numpy(), data[bank.rows])
    again = MemoryBank(32, CoresetSize(0.1, 200, 400), proj_dim=16)
    again.set(bank.rows, data[bank.rows])
    np.testing.assert_array_equal(again.feats.numpy(), bank.feats.numpy())


def test_prune_drops_duplicates_first() -> None:
    """Exact duplicates are the most redundant entries: a prune of their number removes one of each pair."""
    rng = np.random.default_rng(2)
    base = unit(rng, 200)
    data = np.concatenate([base, base[:50]])  # rows 200-249 duplicate rows 0-49
    bank = MemoryBank(32, CoresetSize(1.0, 1000, 1000), proj_dim=16)
    bank.set(np.arange(250), data)
    bank.prune(50)
    assert len(bank) == 200
    kept = set(bank.rows.tolist())
    assert all((i in kept) != (i + 200 in kept) for i in range(50))  # exactly one of each pair stays
    assert set(range(50, 200)) <= kept
    p = project(bank.feats, bank._proj)
    d = sq_dists(p, p)
    d.fill_diagonal_(float("inf"))
    assert float(d.min()) > 0  # no duplicate left

