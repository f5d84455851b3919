"""ThresholdPolicy on lists of numbers: OK percentile, NG margin, NG recall, the false-reject limit, warnings."""

from __future__ import annotations

import numpy as np
import pytest

from core.method.thresholds import ThresholdPolicy

OK = [0.40, 0.42, 0.45, 0.47, 0.50, 0.52, 0.55, 0.58, 0.60, 0.62]


def test_ok_only_is_the_percentile_of_ok_scores() -> None:
    th = ThresholdPolicy("ok_only", ok_percentile=100).decide(OK, [0.9])
    assert th["method"] == "ok_percentile" and th["value"] == pytest.approx(0.62)


def test_separable_ng_sets_the_threshold_between_and_warns_that_it_rose() -> None:
    th = ThresholdPolicy("auto", ok_percentile=100, ng_margin=0.5).decide(OK, [0.80, 0.90])
    assert th["method"] == "ng_calibrated" and th["value"] == pytest.approx(0.71)
    assert any("raised the threshold" in w for w in th["details"]["warnings"])


def test_ng_under_the_threshold_is_reported() -> None:
    th = ThresholdPolicy("auto", ok_percentile=100).decide(OK, [0.45, 0.90, 0.95])
    assert any(w.startswith("1 of 3 NG samples") for w in th["details"]["warnings"])


def test_ng_recall_catches_the_required_share_and_never_rises_above_ok_only() -> None:
    ng = [0.30, 0.56, 0.70, 0.80, 0.90]
    th = ThresholdPolicy("auto", ok_percentile=100, ng_recall=0.8, max_false_reject=0.3).decide(OK, ng)
    assert th["method"] == "ng_recall"
    assert sum(s > th["value"] for s in ng) >= 4 and th["value"] < 0.56
    assert th["details"]["false_rejects"] == sum(s > th["value"] for s in OK) == 3
    high = ThresholdPolicy("auto", ok_percentile=100, ng_recall=0.5).decide(OK, [0.9, 0.95])
    assert high["value"] == pytest.approx(0.62) and high["details"]["capped_at_ok_only"]
    assert "warnings" not in high["details"]  # every NG sample is caught, the threshold did not rise


def test_manual_needs_a_value() -> None:
    assert ThresholdPolicy("manual", manual_value=0.5).decide(OK, [])["value"] == 0.5
    with pytest.raises(ValueError):
        ThresholdPolicy("manual").decide(OK, [])


def _overlapping(seed: int) -> tuple[list[float], list[float]]:
    """40 OK leave-one-out scores and 10 NG scores that overlap (a large, low-contrast kind among them)."""
    rng = np.random.default_rng(seed)
    return list(rng.normal(0.6, 0.05, 40)), list(np.r_[rng.uniform(0.5, 0.62, 4), rng.uniform(0.7, 0.95, 6)])


def test_overlapping_ng_never_rejects_more_good_parts_than_the_limit_and_says_what_passes() -> None:
    for seed in range(10):
        ok, ng = _overlapping(seed)
        th = ThresholdPolicy("auto").decide(ok, ng)
        d = th["details"]
        assert not d["separable"] and d["false_rejects"] <= 0.05 * len(ok), (seed, th)  # at most 2 of 40
        assert d["ng_passing"] == sum(x <= th["value"] for x in ng) > 0
        assert any("pass at the threshold" in w and "max_false_reject" in w for w in d["warnings"]), d
        assert all(x > th["value"] for x in ng if x > d["reject_floor"])  # whatever the limit allows is caught
        looser = ThresholdPolicy("auto", max_false_reject=0.2).decide(ok, ng)
        assert looser["value"] <= th["value"] and looser["details"]["ng_passing"] <= d["ng_passing"]


def test_deleting_one_ok_sample_moves_an_ng_calibrated_threshold_by_less_than_a_tenth() -> None:
    for seed in range(10, 20):  # 30 OK, 10 NG spread over the OK range and above it
        rng = np.random.default_rng(seed)  # seed 14: the best-J cut moved by 18 % when one OK sample went
        ok, ng = list(rng.normal(0.6, 0.06, 30)), list(rng.uniform(0.55, 0.95, 10))
        base = ThresholdPolicy("auto").decide(ok, ng)["value"]
        for i in range(len(ok)):
            moved = ThresholdPolicy("auto").decide(ok[:i] + ok[i + 1 :], ng)["value"]
            assert abs(moved - base) < 0.1 * base, (seed, i, base, moved)


def test_ng_recall_stops_at_the_false_reject_limit_too() -> None:
    ok, ng = _overlapping(3)
    th = ThresholdPolicy("auto", ng_recall=1.0).decide(ok, ng)
    assert th["details"]["false_rejects"] <= 2 and th["details"]["ng_passing"] > 0


def test_a_roi_whose_ng_samples_overlap_its_good_parts_keeps_its_false_rejects_and_says_what_passes(
        tmp_path, extractor, tile) -> None:
    """Real tiles: thin cracks score among good tiles. Calibrated with them, the threshold stays at the
    false-reject limit (at most 5 % of the OK samples above it) instead of dropping to the lowest crack, and
    the state, the page's warnings and the calibrate result say how many NG samples pass."""
    from core.image_io import decode_image
    from core.roi.model import ModelSettings, RoiModel

    free = sorted((tile / "MT_Free" / "Imgs").glob("*.jpg"))
    cracks = sorted((tile / "MT_Crack" / "Imgs").glob("*.jpg"))
    sample = lambda p: (p.read_bytes(), decode_image(p.read_bytes()), {})  # noqa: E731
    model = RoiModel(tmp_path, "st", "tile", extractor, ModelSettings(coreset_min=500, ng_rank="off"))
    model.fit_ok([sample(p) for p in free[:40]])
    result = model.send_ng([sample(p) for p in cracks[:10]])
    d = result["threshold_details"]
    assert d["separable"] is False, d  # the premise: these cracks overlap the good tiles
    ok = model.manifest["ok_scores"]
    assert sum(x > model.threshold for x in ok) <= 0.05 * len(ok) and d["false_rejects"] <= 2, d
    assert model.threshold > min(model.manifest["ng_scores"])  # not moved down to the lowest crack
    assert all(x > model.threshold for x in model.manifest["ng_scores"] if x > d["reject_floor"])  # the rest caught
    codes = {w["code"]: w for w in result["warnings"]}
    assert codes["ng_pass_at_reject_limit"]["passing"] == d["ng_passing"] > 0, codes
    assert model.state()["warnings"] == result["warnings"]
