"""Per-ROI choice of the branches to fuse (core/roi/tuning.py): the maths on random vectors, the behaviour on a
ROI's real samples (tests/test_model.py fits; here the choice itself)."""

from __future__ import annotations

import numpy as np

from core.method.evidence import views as view_choice
from core.method.evidence.views import Evidence, choose
from core.roi import tuning


def _evidence(rng: np.random.Generator, seen: list[float], n: int = 40, ng: list[float] | None = None,
              k: int = 0, own: float = 0.1) -> Evidence:
    """Branch scores of one underlying N(0, 1) per image (branches see the same part; a little noise of their
    own): OK rows, proxies shifted by `seen[b]` in branch b, `k` labels shifted by `ng[b]`."""
    b = len(seen)

    def rows(m: int, shift: list[float]) -> np.ndarray:
        return rng.normal(0, 1, (m, 1)) + rng.normal(0, own, (m, b)) + np.asarray(shift)

    return Evidence(rows(n, [0.0] * b), rows(n, seen), rows(k, ng or [0.0] * b), rows(n, [0.0] * b))


def test_every_set_is_a_candidate_and_a_coarse_only_set_wins_when_only_coarse_views_see_the_defects() -> None:
    assert len(view_choice.candidates(4)) == 15 and (2, 3) in view_choice.candidates(4)
    choice = choose(_evidence(np.random.default_rng(0), [0.0, 0.0, 3.0, 3.0]), tuning.DEFAULT)
    assert choice.changed and choice.active == (2, 3), choice  # the fine branch is dropped: evidence, not a rule
    assert set(choice.figures) == {view_choice.name(c) for c in view_choice.candidates(4)}
    assert choice.by == "proxy" and choice.wins >= view_choice.CONFIDENCE


def test_a_gain_below_the_margin_keeps_the_views_in_force(monkeypatch) -> None:
    # many samples: the resamples are sure branch 2 is a little better, the margin is what holds
    ev = _evidence(np.random.default_rng(3), [1.0, 1.0, 1.06, 0.0], n=1500)
    kept = choose(ev, tuning.DEFAULT)
    assert not kept.changed and kept.active == tuning.DEFAULT and 0 < kept.gain < view_choice.MARGIN, kept
    monkeypatch.setattr(view_choice, "MARGIN", kept.gain / 2)
    assert choose(ev, tuning.DEFAULT).changed  # without the margin the same evidence would switch


def test_a_gain_within_the_noise_keeps_the_views_in_force(monkeypatch) -> None:
    ev = _evidence(np.random.default_rng(0), [1.0, 1.0, 1.3, 0.0], n=12, own=1.0)  # few samples: a gain, but noisy
    kept = choose(ev, tuning.DEFAULT)
    assert kept.gain >= view_choice.MARGIN and kept.wins < view_choice.CONFIDENCE and not kept.changed, kept
    monkeypatch.setattr(view_choice, "CONFIDENCE", 0.0)
    assert choose(ev, tuning.DEFAULT).changed  # the resamples, not the figure, held it


def test_labels_weigh_in_but_ten_cannot_overturn_a_clear_proxy_result() -> None:
    rng = np.random.default_rng(7)
    agree = choose(_evidence(rng, [0.5, 0.5, 2.5, 0.0], ng=[0.5, 0.5, 3.0, 0.0], k=10), tuning.DEFAULT)
    assert agree.by == "proxy+labels" and agree.changed and agree.active == (2,), agree
    assert "labels" in agree.figures["2"]
    # the proxies clearly favour the fine pair, ten labels favour coarse @0.4: the pair stays
    against = choose(_evidence(rng, [2.5, 2.5, 0.0, 0.0], ng=[0.0, 0.0, 0.0, 3.0], k=10), tuning.DEFAULT)
    assert not against.changed and against.active == tuning.DEFAULT, against
    few = choose(_evidence(rng, [0.5, 0.5, 2.5, 0.0], ng=[0.5, 0.5, 3.0, 0.0], k=4), tuning.DEFAULT)
    assert few.by == "proxy"  # under MIN_LABELS labels do not count


def test_one_more_label_does_not_flip_the_choice() -> None:
    rng = np.random.default_rng(11)
    ev = _evidence(rng, [1.5, 1.5, 1.6, 0.0], ng=[1.5, 1.5, 1.7, 0.0], k=12)
    first = choose(Evidence(ev.ok, ev.proxies, ev.ng[:11], ev.ok_loo), tuning.DEFAULT)
    second = choose(ev, first.active)
    assert first.active == second.active == tuning.DEFAULT, (first, second)


def test_when_to_tune() -> None:
    assert not tuning.due(None, tuning.MIN_OK - 1, 4)  # too few samples to judge
    assert not tuning.due(None, 50, 2)  # nothing to choose
    assert tuning.due(None, tuning.MIN_OK, 4)
    done = {"active": [0, 2], "by": "proxy", "branches": 4, "ok_samples": 20, "rule": tuning.RULE}
    assert not tuning.due(done, 24, 4) and tuning.due(done, 25, 4)  # grown by a quarter
    assert tuning.due(done, 19, 4)  # samples deleted
    assert tuning.due(done, 20, 3)  # other branches
    assert tuning.due({**done, "rule": 2}, 20, 4)  # chosen by an older rule
    assert not tuning.due(done, 20, 4, 4) and tuning.due(done, 20, 4, 5)  # labels count from 5
    labelled = {**done, "by": "proxy+labels", "ng_samples": 6}
    assert not tuning.due(labelled, 20, 4, 7) and not tuning.due(labelled, 20, 4, 8)  # not at every NG sample
    assert tuning.due(labelled, 20, 4, 9) and tuning.due(labelled, 20, 4, 4)  # grown by half, or too few again


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
    assert len(model.branches) == 4
    model.fit_ok(samples[:5])
    assert model.state()["fusion"]["active"] == [0, 1] and model.state()["fusion"]["by"] == "default"
    model.fit_ok(samples[5:])
    fusion = model.state()["fusion"]
    assert fusion["by"] == "proxy" and fusion["proxy_images"] == 40 and fusion["ok_samples"] == 10
    assert set(fusion["candidates"]) == {view_choice.name(c) for c in view_choice.candidates(4)}  # coarse-only too
    assert all(0.5 <= c["proxy"] <= 1.0 for c in fusion["candidates"].values()), fusion  # the proxies are found
    assert fusion["previous"] == [0, 1] and fusion["changed"] == (fusion["active"] != [0, 1])
    probe = decode_image(sorted((tire / "test" / "hole" / "rgb").glob("*.png"))[0].read_bytes())
    emb = model.index.embed([probe])[0]
    pred = model.predict([probe])[0]
    assert pred.search.patches == sum(emb.feats[b].shape[0] for b in fusion["active"])  # only those searched
    only = model.index.embed([probe], fusion["active"])[0]  # and only their input scales run through the network
    assert [f is not None for f in only.feats] == [b in fusion["active"] for b in range(4)]
    again = RoiModel(tmp_path, "st", "tire", extractor, ModelSettings(coreset_min=500))
    assert again.scorer.active == fusion["active"]
    assert abs(again.predict([probe])[0].score - pred.score) < 1e-6  # the scales are stored rounded
    every = RoiModel(tmp_path, "st", "tire", extractor, ModelSettings(coreset_min=500, branch_select="all"))
    assert every.state()["fusion"]["active"] == [0, 1, 2, 3] and every.state()["fusion"]["by"] == "all"
