"""Drift of a ROI's predictions: are good parts creeping towards the threshold, or the NG rate rising?

Lighting that ages, a new batch of material or a camera knocked by a millimetre first show as OK scores
that rise, long before good parts are rejected. Per ROI, a rolling window of the last `window`
predictions is compared with what the model was calibrated on:

- `margin_used`: the median score of the recent parts, as a share of the way from the median
  leave-one-out OK score at calibration (0: as usual) to the threshold (1: good parts at the threshold).
  Every recent part counts, also those already judged NG: with only the parts judged OK, brightening good
  tires pushed part after part over the threshold while the median of the rest never reached `warning`
  (tests/test_drift.py; the alert came from the NG-rate rule alone). While fewer than half the parts are
  defective, the median stays on the good ones;
- `ng_rate` of the window against `ng_rate_usual`, the NG rate of the (up to 10 windows of) predictions
  before it, judged once at least one whole window of them exists.

`warning` when margin_used >= `warning` or the NG rate rose by `ng_rate_warning`; `alarm` at `alarm` /
`ng_rate_alarm`. Below `min_predictions` in the window the state is `ok` with `enough_data: false`.
The state clears by itself when the scores return. No I/O here: agent/drift.py keeps and publishes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

STATES = ("ok", "warning", "alarm")


@dataclass
class DriftSettings:
    """Config `drift` (docs/configuration.md)."""

    window: int = 200
    min_predictions: int = 30
    warning: float = 0.5
    alarm: float = 0.8
    ng_rate_warning: float = 0.10
    ng_rate_alarm: float = 0.25


class DriftMonitor:
    def __init__(self, settings: DriftSettings, saved: dict | None = None) -> None:
        self.s = settings
        self.recent: deque[tuple[float, bool]] = deque(maxlen=settings.window)
        self.older: deque[bool] = deque(maxlen=10 * settings.window)  # anomaly flags of what left the window
        if saved:
            self.recent.extend((float(x), bool(a)) for x, a in saved.get("recent", [])[-settings.window:])
            self.older.extend(bool(a) for a in saved.get("older", []))
        self.last_state = str((saved or {}).get("state", "ok"))

    def add(self, score: float, is_anomaly: bool) -> None:
        if len(self.recent) == self.recent.maxlen:
            self.older.append(self.recent[0][1])
        self.recent.append((float(score), bool(is_anomaly)))

    def evaluate(self, threshold: float | None, reference_ok: list[float]) -> dict:
        s = self.s
        ok_scores = [x for x, _ in self.recent]  # all parts: those already over the threshold count too
        n = len(self.recent)
        out: dict = {"state": "ok", "predictions": n, "enough_data": n >= s.min_predictions, "reasons": []}
        ng_rate = sum(a for _, a in self.recent) / n if n else 0.0
        usual = sum(self.older) / len(self.older) if len(self.older) >= s.window else None  # a full window before
        out.update(ng_rate=round(ng_rate, 4), ng_rate_usual=None if usual is None else round(usual, 4))
        ref = float(np.median(reference_ok)) if reference_ok else None
        med = float(np.median(ok_scores)) if ok_scores else None
        used = None
        if ref is not None and med is not None and threshold is not None and threshold > ref:
            used = (med - ref) / (threshold - ref)
        out.update(recent_ok_median=None if med is None else round(med, 6),
                   reference_ok_median=None if ref is None else round(ref, 6),
                   threshold=None if threshold is None else round(float(threshold), 6),
                   margin_used=None if used is None else round(used, 4))
        if not out["enough_data"]:
            return out
        level = 0
        if used is not None and used >= s.warning:
            level = 2 if used >= s.alarm else 1
            out["reasons"].append(f"good parts score {used:.0%} of the way from their usual level to the threshold")
        if usual is not None and ng_rate - usual >= s.ng_rate_warning:
            level = max(level, 2 if ng_rate - usual >= s.ng_rate_alarm else 1)
            out["reasons"].append(f"NG rate {ng_rate:.1%} against a usual {usual:.1%}")
        out["state"] = STATES[level]
        return out

    def to_dict(self, state: str) -> dict:
        return {"state": state, "recent": [[round(x, 6), a] for x, a in self.recent], "older": list(self.older),
                "settings": asdict(self.s)}
