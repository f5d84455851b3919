"""NG labels in the ranking (core/method/ng_rank.py, core/roi/ng_ranking.py): the maths on random vectors, the
behaviour on real magnetic tiles (blowholes, which the plain score ranks among good tiles)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.method import ng_rank
from core.method.fusion import lift_peak

D = 16


def _tops(rng: np.random.Generator, n: int, shift: np.ndarray | None = None) -> list[list[np.ndarray]]:
    """n images' top patches on two branches; `shift`: a direction the defect patches share."""
    out = []
    for _ in range(n):
        per = []
        for _b in range(2):
            x = rng.normal(0, 1, (6, D))
            if shift is not None:
                x += shift
            per.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
        out.append(per)
    return out


def _banks(rng: np.random.Generator) -> list[np.ndarray]:
    return [(lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))(rng.normal(0, 1, (400, D)))
            for _ in range(2)]


def _shared_look() -> tuple:
    """30 OK and 9 NG samples whose NG top patches share a direction the plain scores miss (and the rng, the
    shift, to make more of each)."""
    rng = np.random.default_rng(0)
    shift = np.zeros(D)
    shift[3] = 2.5
    ok_tops, ng_tops, banks = _tops(rng, 30), _tops(rng, 9, shift), _banks(rng)
    ok_scores, ng_scores = rng.normal(1, 0.1, 30).tolist(), rng.normal(1.05, 0.1, 9).tolist()
    return rng, shift, ok_tops, ng_tops, banks, ok_scores, ng_scores


def test_the_top_patches_are_the_most_anomalous_share() -> None:
    d = np.arange(200, dtype=np.float32)[::-1].copy()
    assert sorted(ng_rank.top_rows(d).tolist()) == [0, 1, 2, 3]  # 2 % of 200, the largest distances
    assert ng_rank.top_rows(np.ones(10, np.float32)).size == 1  # at least one


def test_ng_samples_that_share_a_look_the_plain_score_misses_rank_higher() -> None:
    """NG samples whose plain scores sit among the OK ones but whose top patches share a direction: a form is
    chosen, the cross-validated NG terms lift them, and a new image with that look gains over a new OK one."""
    rng, shift, ok_tops, ng_tops, banks, ok_scores, ng_scores = _shared_look()
    choice = ng_rank.choose(ok_scores, ng_scores, ok_tops, ng_tops, banks)
    assert choice.form in ng_rank.FORMS and choice.gains[choice.form] >= ng_rank.GUARD, choice
    assert len(choice.ng_terms) == 9 and min(choice.ng_terms) > 0  # held out, each still looks like the others
    term = ng_rank.fit_term(choice.form, banks, ok_tops, ng_tops, ng_rank.spread_of(ok_scores))
    ok_terms = [term(t) for t in ok_tops]
    assert abs(np.mean(ok_terms)) < 1e-6  # standardised by the OK samples' own figures: no shift of OK scores
    new_ng, new_ok = _tops(rng, 5, shift), _tops(rng, 5)
    assert min(term(t) for t in new_ng) > max(term(t) for t in new_ok)


def test_the_form_in_use_stays_unless_another_gains_clearly_more() -> None:
    """One NG sample more must not flip the form (the issue-34 line trial alternated ng_bank / linear_head at
    every NG sample): the form in use is kept while it still helps and no other gains SWITCH more."""
    _, _, ok_tops, ng_tops, banks, ok_scores, ng_scores = _shared_look()
    free = ng_rank.choose(ok_scores, ng_scores, ok_tops, ng_tops, banks)
    other = next(f for f in ng_rank.FORMS if f != free.form)
    assert free.gains[free.form] - free.gains[other] < ng_rank.SWITCH and free.gains[other] >= ng_rank.GUARD / 2
    kept = ng_rank.choose(ok_scores, ng_scores, ok_tops, ng_tops, banks, incumbent=other)
    assert kept.form == other and "kept" in kept.reason, kept  # without the rule: free.form, a flip
    # between growth steps (5, 8, 12, 18... NG samples) the form decided at the last step stays, even none
    held = ng_rank.choose(ok_scores, ng_scores, ok_tops, ng_tops, banks, incumbent=None, hold_until=12)
    assert held.form is None and held.ng_terms == [] and "until 12" in held.reason, held
    assert [ng_rank.next_step(n) for n in (5, 8, 12, 18)] == [8, 12, 18, 27]


def test_the_ng_scores_that_place_the_threshold_are_the_held_out_ones() -> None:
    """A term scores the NG samples it learnt from too well; the threshold must see them as it will see a new
    defect: each NG sample's term from the folds that did not learn from it."""
    from types import SimpleNamespace

    import torch

    from core.roi import ng_ranking

    rng = np.random.default_rng(0)
    shift = np.zeros(D)
    shift[3] = 2.5
    ok_tops, ng_tops, banks = _tops(rng, 30), _tops(rng, 9, shift), _banks(rng)
    ok, ng = rng.normal(1, 0.1, 30).tolist(), rng.normal(1.05, 0.1, 9).tolist()
    rows = SimpleNamespace(ok_rows={"tops": ok_tops, "ids": [f"ok{i}" for i in range(30)]},
                           ng_rows={"tops": ng_tops, "ids": [f"ng{i}" for i in range(9)]}, by_sample={})
    branches = [SimpleNamespace(bank=SimpleNamespace(feats=torch.from_numpy(b))) for b in banks]
    record, term, ok2, ng2 = ng_ranking.decide("auto", rows, ok, ng, [0, 1], branches, "st/roi")
    assert term is not None and record["form"] == term.form
    in_sample = [x + term(t) for x, t in zip(ng, ng_tops, strict=True)]
    assert np.mean(ng2) < np.mean(in_sample)  # held out: lower than the fitted term gives its own samples
    assert ok2 == pytest.approx([x + term(t) for x, t in zip(ok, ok_tops, strict=True)])
    assert rows.by_sample["ng"] == dict(zip(rows.ng_rows["ids"], ng2, strict=True))  # what the state lists


def test_the_guard_keeps_the_plain_score_when_labels_add_nothing() -> None:
    rng = np.random.default_rng(1)
    ok_tops, ng_tops, banks = _tops(rng, 30), _tops(rng, 9), _banks(rng)
    ok_scores = rng.normal(1, 0.1, 30).tolist()
    ng_scores = (np.array(ok_scores[:9]) + 1.0).tolist()  # already ranked above every OK sample: nothing to gain
    choice = ng_rank.choose(ok_scores, ng_scores, ok_tops, ng_tops, banks)
    assert choice.form is None and choice.ng_terms == [] and max(choice.gains.values()) < ng_rank.GUARD
    few = ng_rank.choose(ok_scores, ng_scores[:4], ok_tops, ng_tops[:4], banks)
    assert few.form is None and few.gains == {} and "fewer than 5 NG" in few.reason
    assert ng_rank.choose(ok_scores[:7], ng_scores, ok_tops[:7], ng_tops, banks).form is None


def test_a_head_learns_from_the_most_recent_ng_samples_only() -> None:
    """A ROI labelled for months: its heads stay as cheap to fit as with MAX_FIT NG samples."""
    rng = np.random.default_rng(3)
    ng_tops, banks = _tops(rng, ng_rank.MAX_FIT + 10), _banks(rng)
    heads = ng_rank.fit_heads("ng_bank", banks, ng_tops)
    assert [h.knn.size for h in heads] == [6 * ng_rank.MAX_FIT] * 2
    assert np.array_equal(heads[0].knn.bank.numpy()[:6], ng_tops[10][0])  # the oldest ten left out


def test_samples_a_form_cannot_be_fitted_on_leave_the_plain_score_and_say_why() -> None:
    """Features no head can learn from (non-finite values in an index written by a faulty disk, say) must not
    stop the ROI's threshold update: the plain score, and the reason in its state."""
    from types import SimpleNamespace

    import torch

    from core.roi import ng_ranking

    rng = np.random.default_rng(4)
    ok_tops, ng_tops, banks = _tops(rng, 30), _tops(rng, 9), _banks(rng)
    for t in ng_tops:
        t[0][:] = np.nan
    rows = SimpleNamespace(ok_rows={"tops": ok_tops, "ids": [f"ok{i}" for i in range(30)]},
                           ng_rows={"tops": ng_tops, "ids": [f"ng{i}" for i in range(9)]}, by_sample={})
    branches = [SimpleNamespace(bank=SimpleNamespace(feats=torch.from_numpy(b))) for b in banks]
    ok, ng = rng.normal(1, 0.1, 30).tolist(), rng.normal(1.05, 0.1, 9).tolist()
    record, term, ok2, ng2 = ng_ranking.decide("auto", rows, ok, ng, [0, 1], branches, "st/roi")
    assert term is None and record["form"] is None and "could not be fitted" in record["reason"]
    assert (ok2, ng2) == (ok, ng)


def test_a_lifted_peak_reaches_the_score_and_leaves_the_background() -> None:
    amap = np.zeros((20, 20), np.float32)
    amap[5:8, 5:8] = 1.0
    amap[6, 6] = 2.0
    lifted = lift_peak(amap, 3.0)
    assert lifted.max() == pytest.approx(3.0) and np.unravel_index(lifted.argmax(), amap.shape) == (6, 6)
    assert (lifted[amap == 0] == 0).all() and lift_peak(amap, 1.5) is amap  # a score under the peak: unchanged


def test_labelled_blowholes_rank_new_blowholes_above_good_tiles(tmp_path: Path, extractor, real_shared: Path) -> None:
    """Real tiles: blowholes score among good tiles under the plain score. With 4 NG samples the ROI keeps the
    plain score and says why; with 9 it chooses a form by cross-validation, says so in its state, and held-out
    blowholes rank above held-out good tiles far better, without more false rejects. The term survives a
    restart (refitted from the stored samples), `ng_rank: off` goes back to the plain score, and a record that
    no longer fits the ROI is decided again at the load instead of stopping it."""
    from core.image_io import decode_image
    from core.roi.model import ModelSettings, RoiModel

    tile = real_shared / "datasets" / "magnetic_tile"
    free = sorted((tile / "MT_Free" / "Imgs").glob("*.jpg"))
    holes = sorted((tile / "MT_Blowhole" / "Imgs").glob("*.jpg"))
    sample = lambda p: (p.read_bytes(), decode_image(p.read_bytes()), {})  # noqa: E731
    held = [decode_image(p.read_bytes()) for p in free[150:162] + holes[30:42]]
    labels = [0] * 12 + [1] * 12
    settings = ModelSettings(coreset_min=500)

    def measured(m: RoiModel) -> tuple[float, int, list]:
        preds = m.predict(held)
        return (roc_auc_score(labels, [p.score for p in preds]), sum(p.is_anomaly for p in preds[:12]), preds)

    model = RoiModel(tmp_path, "st", "tile", extractor, settings)
    model.fit_ok([sample(p) for p in free[:16]])
    model.send_ng([sample(p) for p in holes[:4]])
    state = model.state()["ng_rank"]
    assert state["form"] is None and "fewer than 5 NG" in state["reason"]
    plain_auc, plain_frr, preds = measured(model)
    assert model.scorer.ng is None

    model.send_ng([sample(p) for p in holes[4:9]])
    state = model.state()["ng_rank"]
    assert state["form"] in ng_rank.FORMS and state["ng_samples"] == 9, state
    assert state["cv_auroc_gain"][state["form"]] >= ng_rank.GUARD
    auc, frr, preds = measured(model)
    assert auc >= plain_auc + 0.1 and frr <= plain_frr, (plain_auc, auc, plain_frr, frr)
    assert model.scorer.ng is not None and model.scorer.can_certify(False)  # the term keeps the certified search
    flagged = [p for p in preds if p.is_anomaly]
    assert flagged and all(p.regions for p in flagged)  # a lifted score keeps its region

    again = RoiModel(tmp_path, "st", "tile", extractor, settings)
    assert again.version == model.version  # nothing re-decided: the record fits
    assert np.allclose([p.score for p in again.predict(held[:4])], [p.score for p in preds[:4]], atol=1e-5)

    path = model.store.manifest_path
    manifest = json.loads(path.read_text())
    manifest["ng_rank"]["active"] = [0, 2]  # valid, but not the branches this ROI fuses
    path.write_text(json.dumps(manifest))
    redecided = RoiModel(tmp_path, "st", "tile", extractor, settings)
    assert redecided.version == model.version + 1 and redecided.manifest["ng_rank"]["active"] == [0, 1]
    assert redecided.state()["ng_rank"]["form"] == state["form"]

    off = RoiModel(tmp_path, "st", "tile", extractor, ModelSettings(coreset_min=500, ng_rank="off"))
    assert "ng_rank" not in off.state() and off.scorer.ng is None
    assert off.manifest["threshold"]["value"] != model.threshold

    # issue 33: good tiles sent as NG (by mistake, or by anyone on an open broker) score like good parts: the
    # ones below the OK samples' median are reported, no term learns from them and they do not place the
    # threshold; not one real blowhole is taken for one. With suspect_policy refuse they are not kept; and
    # a ROI keeps at most lifecycle.max_ng_samples NG samples.
    from core.errors import InputError
    from core.roi.lifecycle import LifecycleSettings

    assert not [x for x in model.manifest["suspect_samples"] if x.get("kind") == "ng"]  # 9 blowholes: none
    goods_as_ng = [sample(p) for p in free[100:108]]
    model.send_ng(goods_as_ng)
    flagged = {x["sample_id"] for x in model.manifest["suspect_samples"] if x.get("kind") == "ng"}
    ng_ids = [r.sample_id for r in model.store.list_samples("ng")]
    blowhole_ids = set(ng_ids[:9])
    assert len(flagged) >= 3 and not flagged & blowhole_ids, (flagged, ng_ids)
    record = model.manifest["ng_rank"]
    assert record["ng_samples"] == 17 and record["form"] is not None and set(record["ignored"]) == flagged, record
    if 17 - len(flagged) < ng_rank.next_step(9):  # the NG samples that count, before the next growth step
        assert "kept until" in record["reason"], record
    assert len(model.manifest["ng_scores"]) == 17 - len(flagged)  # the threshold sees the others only
    strict = RoiModel(tmp_path, "st", "tile", extractor, settings,
                      lifecycle=LifecycleSettings(suspect_policy="refuse", max_ng_samples=20))
    rep = strict.send_ng([sample(p) for p in free[110:113]])
    kept = {r.sample_id for r in strict.store.list_samples("ng")}
    assert set(rep.get("refused", [])) and not set(rep["refused"]) & kept, rep.get("refused")
    with pytest.raises(InputError, match="max_ng_samples") as exc:
        strict.send_ng([sample(p) for p in holes[40:44]])
    assert exc.value.code == "too_many_samples"
