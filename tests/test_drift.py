"""Drift on real images: good tire parts whose lighting brightens step by step raise `warning`, then
`alarm`; the state clears when the scores return (core/drift.py fed by real predictions)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from core.drift import DriftMonitor, DriftSettings
from core.image_io import decode_image
from core.roi.model import RoiModel

RAMP = (1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0)  # brightness gain per step of 10 good parts


def brighter(path: Path, gain: float):
    img = np.clip(cv2.imread(str(path)).astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return decode_image(cv2.imencode(".png", img)[1].tobytes())


@pytest.fixture(scope="module")
def model(tmp_path_factory, tire: Path, extractor) -> RoiModel:
    m = RoiModel(tmp_path_factory.mktemp("drift"), "st", "tire", extractor)
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:10]
    m.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in train])
    return m


def test_brightening_good_parts_raise_warning_then_alarm_and_clear(real_tire: Path, model) -> None:
    good = sorted((real_tire / "test" / "good" / "rgb").glob("*.png"))[:10]
    # the NG-rate rule off (it fires too as parts get flagged): the margin rule alone must raise the alerts
    mon = DriftMonitor(DriftSettings(window=10, min_predictions=5, ng_rate_warning=1.0, ng_rate_alarm=1.0))
    states, reasons = [], []
    for gain in (*RAMP, 1.0, 1.0):
        for p in good:
            pred = model.predict([brighter(p, gain)])[0]
            mon.add(pred.score, pred.is_anomaly)
        state = mon.evaluate(model.threshold, model.manifest["ok_scores"])
        states.append((gain, state["state"], state["margin_used"], state["ng_rate"]))
        reasons.append(state["reasons"])
    seen = [s for _, s, _, _ in states]
    assert seen[0] == "ok", states
    first_alert = next(i for i, s in enumerate(seen) if s != "ok")
    assert seen[first_alert] == "warning", states  # a warning comes before the alarm
    # and for the reason under test: good parts creeping towards the threshold, not the NG-rate rule
    assert any("of the way from their usual level to the threshold" in r for r in reasons[first_alert]), reasons
    assert states[first_alert][2] >= 0.5, states  # margin_used at the warning level
    assert "alarm" in seen[first_alert + 1 : len(RAMP)], states
    assert seen[-1] == "ok", states  # the scores returned: the state clears by itself


def test_too_few_predictions_judge_nothing_and_the_window_survives_a_save() -> None:
    mon = DriftMonitor(DriftSettings(window=10, min_predictions=5))
    for _ in range(4):
        mon.add(0.9, False)
    out = mon.evaluate(1.0, [0.5, 0.5, 0.5])
    assert out["state"] == "ok" and not out["enough_data"] and out["margin_used"] == pytest.approx(0.8)
    mon.add(0.9, False)
    assert mon.evaluate(1.0, [0.5])["state"] == "alarm"
    again = DriftMonitor(DriftSettings(window=10, min_predictions=5), mon.to_dict("alarm"))
    assert again.evaluate(1.0, [0.5]) == mon.evaluate(1.0, [0.5])


def test_an_unusable_saved_window_starts_again(tmp_path: Path, model: RoiModel) -> None:
    from agent.drift import DriftTracker, drift_path

    path = drift_path(model.store.root.parents[2], model.store.role_id, model.store.roi_id)
    for text in ('{"recent": [["x", true]], "older": 5}', '{"recent": 7}', "[]", "{broken"):
        path.write_text(text)
        tracker = DriftTracker(model.store.root.parents[2], DriftSettings(window=10, min_predictions=5))
        assert tracker.observe(model, 0.1, False) is None  # evaluated, not raised
        assert tracker.history(model.store.role_id, model.store.roi_id) == [(0.1, False)]


def test_the_saved_window_is_checked_by_its_schema_where_it_is_read(tmp_path: Path, model: RoiModel,
                                                                    caplog) -> None:
    """The load site itself refuses a drift.json that fails its schema (what /models and the CLI `models` read
    too, where no tracker's fallback hides it), and says so at WARNING."""
    import logging

    from agent.drift import drift_path, read_drift, saved_drift

    root, role, roi = model.store.root.parents[2], model.store.role_id, model.store.roi_id
    drift_path(root, role, roi).write_text('{"recent": [["x", true]], "older": 5, "last": {"state": "alarm"}}')
    with caplog.at_level(logging.WARNING, logger="agent.drift"):
        assert saved_drift(root, role, roi) is None and read_drift(root, role, roi) is None
    assert "the drift window starts again" in caplog.text
