"""Decision thresholds from OK scores (not in the bank), NG calibration samples, or a manual value.

- auto with OK only: the `ok_percentile` (default 99th) of leave-one-out OK scores, i.e. every stored
  OK sample scored against the bank without its own patches. With a single OK sample there is
  nothing to leave out; copies of it with a station's usual nuisance (one-stride shift, +-2 degree
  rotation, +-5 % scale, +-10 % brightness; `model.nuisance_views`) are scored instead, so a one-shot
  model still gets a usable threshold, not one at its own (near-zero) self-distance.
- with NG samples: if OK and NG scores separate, the threshold sits `ng_margin` of the way from the
  highest OK score to the lowest NG score (0.5: midway). Otherwise it never goes below the false-reject
  floor: the score above which at most `max_false_reject` (default 0.05) of the OK samples lie; it sits
  `ng_margin` of the way from that floor to the lowest NG score above it (at most the OK-only 99th
  percentile: overlapping NG samples never make the ROI less sensitive), and the NG samples at or under
  the floor pass: counted (`ng_passing`) and said in the warnings, instead of the threshold dropping to
  the lowest NG score and rejecting good parts a line cannot live with. Deleting one OK sample moves the
  floor to a neighbouring OK score at most.
- with NG samples and `ng_recall` set (e.g. 0.95): the threshold is placed so that at least that
  share of the NG samples scores above it, and never above the OK-only threshold, so NG samples can only
  make detection stricter; the false rejects this costs on the OK samples are reported.
- manual: the configured value, kept as is.

Every NG-calibrated threshold says in its `warnings` when NG samples score under it, and when NG
calibration raised it above the OK-only threshold (defects like those samples' but milder then pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.errors import InputError

MAX_FALSE_REJECT = 0.05  # an NG-calibrated threshold rejects at most this share of the OK samples
OK_ONLY_PERCENTILE = 99.0  # overlapping NG samples never raise the threshold above this OK percentile


def ok_threshold(ok_scores: list[float], percentile: float = 99.0) -> dict:
    scores = np.asarray(ok_scores, dtype=np.float64)
    value = float(np.percentile(scores, percentile))
    return {"value": value, "method": "ok_percentile", "details": {
        "percentile": percentile, "n_ok": int(scores.size), "ok_max": float(scores.max()),
        "ok_mean": float(scores.mean())}}


def reject_floor(ok_scores: list[float], max_false_reject: float) -> float:
    """The lowest threshold at which at most `max_false_reject` of the OK samples (their leave-one-out scores)
    score above it: the (k+1)-th highest OK score, k = floor(max_false_reject x n)."""
    ok = np.sort(np.asarray(ok_scores, dtype=np.float64))
    k = int(math.floor(max_false_reject * ok.size + 1e-9))
    return float(ok[max(0, ok.size - 1 - k)])


def ng_threshold(ok_scores: list[float], ng_scores: list[float], margin: float = 0.5,
                 max_false_reject: float = MAX_FALSE_REJECT) -> dict:
    """Separable: `margin` of the way from the highest OK to the lowest NG score. Overlapping: never below
    the false-reject floor (at most `max_false_reject` of the OK samples above it); `margin` of the way from
    the floor to the lowest NG score above it, never above the OK-only 99th percentile (NG samples that
    overlap the good parts must not make the ROI blind to milder defects), and the NG samples at or under the
    floor pass (counted)."""
    ok = np.asarray(ok_scores, dtype=np.float64)
    ng = np.asarray(ng_scores, dtype=np.float64)
    details = {"n_ok": int(ok.size), "n_ng": int(ng.size), "ok_max": float(ok.max()), "ng_min": float(ng.min()),
               "max_false_reject": max_false_reject}
    if ok.max() < ng.min():
        value = float(ok.max() + margin * (ng.min() - ok.max()))
        details.update(separable=True, margin=margin, false_rejects=0, false_accepts=0, ng_passing=0)
        return {"value": value, "method": "ng_calibrated", "details": details}
    floor = reject_floor(ok_scores, max_false_reject)
    above = ng[ng > floor]
    value = float(floor + margin * (above.min() - floor)) if above.size else floor
    ok_only = ok_threshold(ok_scores, OK_ONLY_PERCENTILE)["value"]
    value = max(floor, min(value, ok_only))  # overlapping NG never makes the ROI less sensitive than OK-only
    passing = int((ng <= value).sum())
    details.update(separable=False, margin=margin, reject_floor=floor, false_rejects=int((ok > value).sum()),
                   false_accepts=passing, ng_passing=passing)
    return {"value": value, "method": "ng_calibrated", "details": details}


def recall_threshold(ok_scores: list[float], ng_scores: list[float], recall: float, percentile: float,
                     max_false_reject: float = MAX_FALSE_REJECT) -> dict:
    """The highest threshold under which at most (1 - recall) of the NG samples fall, capped at the
    OK-only threshold and never below the false-reject floor (the recall then falls short: reported)."""
    ok = np.asarray(ok_scores, dtype=np.float64)
    ng = np.sort(np.asarray(ng_scores, dtype=np.float64))[::-1]
    need = max(1, math.ceil(recall * ng.size))
    value = float(np.nextafter(ng[need - 1], -np.inf))  # flag score > threshold: the need-th NG is caught
    ok_only = ok_threshold(ok_scores, percentile)["value"]
    capped = value >= ok_only
    floor = reject_floor(ok_scores, max_false_reject)
    value = max(min(value, ok_only), min(floor, ok_only))
    return {"value": value, "method": "ng_recall", "details": {
        "n_ok": int(ok.size), "n_ng": int(ng.size), "ng_recall": recall, "ok_only_threshold": ok_only,
        "capped_at_ok_only": capped, "max_false_reject": max_false_reject, "reject_floor": floor,
        "false_rejects": int((ok > value).sum()), "false_accepts": int((ng <= value).sum()),
        "ng_passing": int((ng <= value).sum())}}


def manual_threshold(value: float) -> dict:
    return {"value": float(value), "method": "manual", "details": {}}


def ng_warnings(th: dict, ng_scores: list[float], ok_only: float | None) -> list[str]:
    """What an operator must know about an NG-calibrated threshold."""
    out = []
    value = th.get("value")
    if value is None or not ng_scores:
        return out
    under = int((np.asarray(ng_scores) <= value).sum())
    if under and th.get("details", {}).get("separable") is False:
        limit = th["details"].get("max_false_reject", MAX_FALSE_REJECT)
        out.append(f"{under} of {len(ng_scores)} NG samples pass at the threshold {value:.4f}: OK and NG scores "
                   f"overlap, and a lower threshold would reject more than {limit:.0%} of good parts "
                   f"(max_false_reject)")
    elif under:
        out.append(f"{under} of {len(ng_scores)} NG samples score at or under the threshold {value:.4f}: "
                   f"parts like them pass")
    if ok_only is not None and value > ok_only:
        out.append(f"NG calibration raised the threshold above the OK-only threshold ({ok_only:.4f} -> {value:.4f}): "
                   f"fewer false rejects, but defects milder than the NG samples pass; set ng_recall to keep it "
                   f"from rising")
    return out


def preview(value: float, current: float | None, ok_scores: list[float], ng_scores: list[float],
            recent: list[float]) -> dict:
    """What a threshold of `value` would change before it is applied: stored OK samples (their leave-one-out
    scores) flagged, NG samples passing, recent predictions whose verdict flips (score > threshold: NG)."""
    cur = math.inf if current is None else current
    ok, ng = np.asarray(ok_scores, np.float64), np.asarray(ng_scores, np.float64)
    rec = np.asarray(recent, np.float64)
    return {"threshold": value, "current": current, "n_ok": int(ok.size), "n_ng": int(ng.size),
            "n_recent": int(rec.size),
            "ok_flagged": int((ok > value).sum()), "ok_flagged_now": int((ok > cur).sum()),
            "ng_passing": int((ng <= value).sum()), "ng_passing_now": int((ng <= cur).sum()),
            "recent_to_ng": int(((rec > value) & (rec <= cur)).sum()),
            "recent_to_ok": int(((rec <= value) & (rec > cur)).sum())}


POLICIES = ("auto", "ok_only", "manual")


@dataclass
class ThresholdPolicy:
    """How a ROI's threshold is decided (config settings, overridden by a calibrate request)."""

    policy: str = "auto"
    ok_percentile: float = 99.0
    ng_margin: float = 0.5
    ng_recall: float | None = None
    manual_value: float | None = None
    max_false_reject: float = MAX_FALSE_REJECT

    def decide(self, ok_scores: list[float], ng_scores: list[float]) -> dict:
        if self.policy == "manual":
            if self.manual_value is None:
                raise ValueError("threshold_policy 'manual' needs threshold_value")
            return manual_threshold(self.manual_value)
        if not ok_scores:
            return {"value": None, "method": "none", "details": {}}
        ok_only = ok_threshold(ok_scores, self.ok_percentile)
        if self.policy != "auto" or not ng_scores:
            return ok_only
        if self.ng_recall is not None:
            th = recall_threshold(ok_scores, ng_scores, self.ng_recall, self.ok_percentile, self.max_false_reject)
        else:
            th = ng_threshold(ok_scores, ng_scores, self.ng_margin, self.max_false_reject)
        warnings = ng_warnings(th, ng_scores, ok_only["value"])
        if warnings:
            th["details"]["warnings"] = warnings
        return th


CALIBRATION_POLICIES = (None, "auto", "ok_only", "manual", "config")


def requested_policy(policy: str | None, threshold: float | None, reset: bool) -> str | None:
    """The policy a calibrate request means (CLI, HTTP, MQTT alike): a `threshold` alone is a manual
    override, `reset` alone goes back to the config, no argument recomputes with the current policy."""
    if threshold is not None and policy in (None, "manual"):
        return "manual"
    if reset and policy is None:
        return "config"
    return policy


def check_calibration(policy: str | None, value: float | None, ok_percentile: float | None, ng_margin: float | None,
                      ng_recall: float | None) -> None:
    """A calibrate request's arguments, or InputError saying which one is wrong."""
    if policy not in CALIBRATION_POLICIES:
        raise InputError(f"policy must be one of {', '.join(p for p in CALIBRATION_POLICIES if p)}, got {policy!r}",
                         code="invalid_policy")
    if ok_percentile is not None and not 0 < ok_percentile <= 100:
        raise InputError(f"ok_percentile must be in (0, 100], got {ok_percentile}", code="invalid_policy")
    if ng_margin is not None and not 0 <= ng_margin <= 1:
        raise InputError(f"ng_margin must be in [0, 1], got {ng_margin}", code="invalid_policy")
    if ng_recall is not None and not 0 < ng_recall <= 1:
        raise InputError(f"ng_recall must be in (0, 1], got {ng_recall}", code="invalid_policy")
    if policy == "manual" and (value is None or not math.isfinite(value) or value <= 0):
        raise InputError(f"threshold must be a finite number > 0, got {value}", code="invalid_threshold")
