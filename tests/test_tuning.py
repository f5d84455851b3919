"""Per-ROI choice of the branches to fuse (core/roi/tuning.py): the maths on random vectors, the behaviour on a
ROI's real samples (tests/test_model.py fits; here the choice itself)."""

from __future__ import annotations

import numpy as np

from core.method.fusion import BranchScale
from core.roi import tuning


def _scales(ok: np.ndarray) -> list[BranchScale]:
    return [BranchScale.of(list(ok[:, b])) for b in range(ok.shape[1])]


def test_the_set_that_separates_the_proxies_is_chosen() -> None:
    rng = np.random.default_rng(0)
    ok = rng.normal(0, 1, (30, 3))
    proxies = rng.normal(0, 1, (40, 3))
    proxies[:, 2] += 3.0  # only the third branch sees the synthetic defects
    best, aucs = tuning.choose(ok, proxies, _scales(ok))
    assert best == (0, 2), aucs
    assert set(aucs) == {"0+1", "0+2", "0+1+2"}  # fused sets that keep the fine branch: none alone, none without it


def test_the_fine_branch_stays_even_when_the_proxies_favour_the_coarse_views() -> None:
    rng = np.random.default_rng(2)
    ok = rng.normal(0, 1, (30, 3))
    proxies = rng.normal(0, 1, (40, 3))
    proxies[:, 1:] += 3.0  # both coarse views see the synthetic defects, the fine one not at all
    best, aucs = tuning.choose(ok, proxies, _scales(ok))
    assert best == (0, 1, 2) and 0 in best, aucs
    assert tuning.candidates(4) == [(0, 1), (0, 2), (0, 3), (0, 1, 2), (0, 1, 3), (0, 2, 3), (0, 1, 2, 3)]


def test_the_default_pair_stays_unless_another_set_is_clearly_better() -> None:
    rng = np.random.default_rng(1)
    ok = rng.normal(0, 1, (30, 3))
    proxies = rng.normal(2, 1, (40, 3))  # every branch alike: differences are noise
    best, aucs = tuning.choose(ok, proxies, _scales(ok))
    assert best == tuning.DEFAULT, aucs
    assert max(aucs.values()) - aucs["0+1"] < tuning.MARGIN


def test_when_to_tune() -> None:
    assert not tuning.due(None, tuning.MIN_OK - 1, 3)  # too few samples to judge
    assert not tuning.due(None, 50, 2)  # nothing to choose
    assert tuning.due(None, tuning.MIN_OK, 3)
    done = {"active": [0, 2], "by": "proxy", "branches": 3, "ok_samples": 20}
    assert not tuning.due(done, 24, 3) and tuning.due(done, 25, 3)  # grown by a quarter
    assert tuning.due(done, 19, 3)  # samples deleted
    assert tuning.due(done, 20, 4)  # other branches


def test_the_fusion_in_force() -> None:
    done = {"active": [0, 2], "by": "proxy", "branches": 3, "ok_samples": 20}
    assert tuning.current(done, "auto", 3)["active"] == [0, 2]
    assert tuning.current(done, "all", 3)["active"] == [0, 1, 2]
    assert tuning.current(done, "default", 3) == {"active": [0, 1], "by": "default", "branches": 3}  # never tuned
    assert tuning.current(done, "auto", 2)["active"] == [0, 1]  # chosen for other branches: not used
    assert tuning.current({"active": [7], "by": "proxy", "branches": 3}, "auto", 3)["active"] == [0, 1]
    assert tuning.current(None, "auto", 1)["active"] == [0]


def test_a_roi_chooses_its_branches_from_its_own_samples_and_predicts_with_them(tmp_path, extractor, tire) -> None:
    """Real images: below 8 OK samples the default pair; from 8 on, synthetic defects of its own samples
    decide, the state says which set and every candidate's figure, a prediction searches only the chosen
    branches, the choice survives a restart, and `branch_select: all` fuses every branch."""
    from core.image_io import decode_image
    from core.roi.model import ModelSettings, RoiModel

    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:10]
    samples = [(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in train]
    model = RoiModel(tmp_path, "st", "tire", extractor, ModelSettings(coreset_min=500))
    assert len(model.branches) == 3
    model.fit_ok(samples[:5])
    assert model.state()["fusion"]["active"] == [0, 1] and model.state()["fusion"]["by"] == "default"
    model.fit_ok(samples[5:])
    fusion = model.state()["fusion"]
    assert fusion["by"] == "proxy" and fusion["proxy_images"] == 40 and fusion["ok_samples"] == 10
    assert set(fusion["proxy_auroc"]) == {"0+1", "0+2", "0+1+2"} and 0 in fusion["active"]
    assert all(0.5 <= a <= 1.0 for a in fusion["proxy_auroc"].values()), fusion  # the proxies are found
    probe = decode_image(sorted((tire / "test" / "hole" / "rgb").glob("*.png"))[0].read_bytes())
    emb = model.index.embed([probe])[0]
    pred = model.predict([probe])[0]
    assert pred.search.patches == sum(emb.feats[b].shape[0] for b in fusion["active"])  # only those searched
    only = model.index.embed([probe], fusion["active"])[0]  # and only their input scales run through the network
    assert [f is not None for f in only.feats] == [b in fusion["active"] for b in range(3)]
    again = RoiModel(tmp_path, "st", "tire", extractor, ModelSettings(coreset_min=500))
    assert again.scorer.active == fusion["active"]
    assert abs(again.predict([probe])[0].score - pred.score) < 1e-6  # the scales are stored rounded
    every = RoiModel(tmp_path, "st", "tire", extractor, ModelSettings(coreset_min=500, branch_select="all"))
    assert every.state()["fusion"]["active"] == [0, 1, 2] and every.state()["fusion"]["by"] == "all"
