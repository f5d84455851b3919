"""ThresholdPolicy on lists of numbers: OK percentile, NG margin, NG recall and its warnings."""

from __future__ import annotations

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
    th = ThresholdPolicy("auto", ok_percentile=100, ng_recall=0.8).decide(OK, ng)
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
