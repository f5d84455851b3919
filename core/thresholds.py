"""Decision thresholds from OK scores (not in the bank), NG calibration samples, or a manual value.

- auto with OK only: the `ok_percentile` (default 99th) of leave-one-out OK scores, i.e. every stored
  OK sample scored against the bank without its own patches. With a single OK sample there is
  nothing to leave out; copies of it with a station's usual nuisance (one-stride shift, +-2 degree
  rotation, +-5 % scale, +-10 % brightness; `model.nuisance_views`) are scored instead, so a one-shot
  model still gets a usable threshold, not one at its own (near-zero) self-distance.
- with NG samples: if OK and NG scores separate, the threshold sits `ng_margin` of the way from the
  highest OK score to the lowest NG score (0.5: midway); otherwise the cut that maximises
  Youden's J (TPR - FPR) on the ROC curve (scikit-learn), reported with the errors it leaves.
- manual: the configured value, kept as is.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve


def ok_threshold(ok_scores: list[float], percentile: float = 99.0) -> dict:
    scores = np.asarray(ok_scores, dtype=np.float64)
    value = float(np.percentile(scores, percentile))
    return {"value": value, "method": "ok_percentile", "details": {
        "percentile": percentile, "n_ok": int(scores.size), "ok_max": float(scores.max()),
        "ok_mean": float(scores.mean())}}


def ng_threshold(ok_scores: list[float], ng_scores: list[float], margin: float = 0.5) -> dict:
    ok = np.asarray(ok_scores, dtype=np.float64)
    ng = np.asarray(ng_scores, dtype=np.float64)
    details = {"n_ok": int(ok.size), "n_ng": int(ng.size), "ok_max": float(ok.max()), "ng_min": float(ng.min())}
    if ok.max() < ng.min():
        value = float(ok.max() + margin * (ng.min() - ok.max()))
        details.update(separable=True, margin=margin, false_rejects=0, false_accepts=0)
    else:
        y = np.r_[np.zeros(ok.size), np.ones(ng.size)]
        fpr, tpr, cuts = roc_curve(y, np.r_[ok, ng])
        best = int(np.argmax(tpr - fpr))
        value = float(cuts[best]) if np.isfinite(cuts[best]) else float(ng.max())
        # scikit-learn predicts positive for score >= cut; we flag score > threshold, so step just below
        value = float(np.nextafter(value, -np.inf))
        details.update(separable=False, false_rejects=int((ok > value).sum()), false_accepts=int((ng <= value).sum()))
    return {"value": value, "method": "ng_calibrated", "details": details}


def manual_threshold(value: float) -> dict:
    return {"value": float(value), "method": "manual", "details": {}}
