"""BankDistances against brute force on random unit vectors: many adds and prunes, every path exercised
(entries added near patches, pruned nearest neighbours re-searched, a leave-one-out exclusion)."""

from __future__ import annotations

import numpy as np
import torch

from core.method.bank_distances import BankDistances
from core.method.knn import NearestNeighbour


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_delta_updates_match_brute_force_through_adds_and_prunes() -> None:
    rng = np.random.default_rng(3)
    dim = 8
    feats = {r: v for r, v in enumerate(_unit(rng.normal(size=(300, dim))))}  # row -> vector
    bank = list(range(300))
    samples = {f"s{i}": _unit(rng.normal(size=(40, dim))) for i in range(4)}
    own = {"s0": set(range(0, 30))}  # s0 is scored without these rows (leave-one-out)
    next_row = 300
    bd = BankDistances(full_share=10.0)
    totals = {"searched": 0, "updated": 0, "unchanged": 0}
    for step in range(40):
        if step:
            # prune rows that are the nearest of some patches (forces re-searches) and some at random
            q = np.concatenate(list(samples.values()))
            b = np.stack([feats[r] for r in bank])
            nearest = {bank[j] for j in np.argmax(q @ b.T, 1)[rng.choice(len(q), 12, replace=False)]}
            gone = nearest | set(rng.choice(bank, 5, replace=False).tolist())
            bank = [r for r in bank if r not in gone]
            # add entries near random patches (they become nearest neighbours) and some at random
            near = q[rng.choice(len(q), 10, replace=False)] + 0.15 * rng.normal(size=(10, dim))
            for v in _unit(np.concatenate([near, rng.normal(size=(4, dim))])):
                feats[next_row] = v
                bank.append(next_row)
                next_row += 1
        rows = np.asarray(bank, np.int64)
        bank_feats = torch.from_numpy(np.stack([feats[r] for r in bank]))
        bd.begin(NearestNeighbour(bank_feats, "torch"), rows, bank_feats)
        for key, q in samples.items():
            exclude = torch.from_numpy(np.isin(rows, list(own[key]))) if key in own else None
            score = bd.score((key, "x"), torch.from_numpy(q), exclude, lambda d: float(d.max()))
            sims = q @ bank_feats.numpy().T
            if exclude is not None:
                sims[:, exclude.numpy()] = -4.0
            expect = np.sqrt(np.clip(2 - 2 * sims.max(1), 0, None))
            current = bd._items[(key, "x")].dist
            assert np.allclose(current, expect, atol=1e-5), (step, key, np.abs(current - expect).max())
            assert score == float(current.max())
        stats = bd.end()
        for k in totals:
            totals[k] += stats[k]
    assert totals["searched"] > 100 and totals["updated"] > 100, totals
