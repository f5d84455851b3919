"""A ROI's settings and its manifest (manifest.json): what is stored about a model, and its public state."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.method.memory_bank import CoresetSize
from core.method.scoring import SCORE_STATS
from core.method.thresholds import POLICIES, ThresholdPolicy
from core.roi.versions import RoiVersions
from core.storage import RoiStore, list_rois, read_mask, utc_now

log = logging.getLogger(__name__)


def _opt(default: object, doc: str, **limits: object) -> Any:
    """A setting with its limits (ge/gt/le/lt, choices) and meaning: the config schema (agent/config.py
    RoiSettings) is generated from these, so a limit is written once."""
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass
class ModelSettings:
    """Per-ROI settings (config `defaults`, overridable per ROI). See docs/configuration.md."""

    coreset_ratio: float = _opt(0.1, "share of a fit's patches kept in the bank", gt=0, le=1)
    coreset_min: int = _opt(4096, "the bank keeps at least this many patches", ge=0)
    coreset_max: int = _opt(8192, "and at most this many", ge=64)
    proj_dim: int = _opt(64, "random projection for the k-center greedy selection", config=False)
    score_stat: str = _opt("max", "image score from the map", choices=SCORE_STATS)
    score_percentile: float = _opt(99.0, "the percentile when score_stat is percentile", gt=0, lt=100)
    blur_sigma: float = _opt(4.0, "Gaussian blur of the anomaly map (pixels at the backbone input)", ge=0)
    threshold_policy: str = _opt("auto", "how the threshold is set", choices=POLICIES)
    threshold_value: float | None = _opt(None, "the threshold of threshold_policy manual", gt=0)
    ok_percentile: float = _opt(99.0, "percentile of leave-one-out OK scores (auto without NG, ok_only)", gt=0,
                                le=100)
    holdout_max: int = _opt(50, "at most this many recent OK samples are scored leave-one-out", ge=1)
    ng_margin: float = _opt(0.5, "0..1 of the way from the highest OK to the lowest NG score", ge=0, le=1)
    ng_recall: float | None = _opt(None, "share of NG samples that must score above the threshold", gt=0, le=1)
    max_false_reject: float = _opt(0.05, "an NG-calibrated threshold rejects at most this share of the OK samples "
                                   "(leave-one-out); NG samples under it pass and are counted", ge=0, lt=1)
    memory_fit: bool = _opt(False, "keep the raw embeddings in RAM during fits (bounded by memory_fit_max_mb)")
    memory_fit_max_mb: float = _opt(512.0, "RAM bound of memory_fit", gt=0)
    fit_batch_size: int = _opt(8, "images per backbone forward in a fit", ge=1, le=256)
    min_defect_area_px: int = _opt(0, "regions smaller than this are not reported", ge=0)
    knn_backend: str = _opt("auto", "nearest-neighbour search", choices=("auto", "faiss", "torch"))
    branch_select: str = _opt("auto", "which branches a ROI fuses: auto (chosen at fit time from its own OK samples "
                              "and synthetic defects made from them), default (fine + coarse, never tuned) or all",
                              choices=("auto", "default", "all"))
    ng_rank: str = _opt("auto", "NG samples in the ranking: auto (from 5 NG samples on, an NG-aware term is added "
                        "to the score when cross-validation over the ROI's own NG samples shows it separates "
                        "them better) or off (NG samples move only the threshold)", choices=("auto", "off"))
    knn_search: str = _opt("certified", "predictions without a heatmap search exactly only the patches that decide "
                           "the score and regions (same results)", choices=("certified", "exact"))

    def coreset_size(self) -> CoresetSize:
        return CoresetSize(self.coreset_ratio, self.coreset_min, self.coreset_max)

    def bank_key(self) -> dict:
        return {"coreset_ratio": self.coreset_ratio, "coreset_min": self.coreset_min,
                "coreset_max": self.coreset_max, "proj_dim": self.proj_dim}


SEARCH_ONLY = ("knn_backend", "knn_search")  # how the search runs, not what it finds: no new model version


def new_manifest(role_id: str, roi_id: str, identity: dict, settings: dict) -> dict:
    """The manifest of a ROI nobody has fitted yet (version 0)."""
    return {"format": 1, "role_id": role_id, "roi_id": roi_id, "version": 0, "backbone": identity,
            "settings": settings, "threshold": {"value": None, "method": "none", "details": {}},
            "counts": {"ok": 0, "ng": 0, "bank": 0, "patches": 0}, "ok_scores": [], "ng_scores": [],
            "created_utc": utc_now(), "updated_utc": utc_now()}


def result_settings(settings: dict | None) -> dict | None:
    """The settings that decide a model's results (a change of any other is not a change of the model); a
    setting newer than the manifest counts as its default (a ROI written before it is not rebuilt for it)."""
    if settings is None:
        return None
    return {k: v for k, v in {**asdict(ModelSettings()), **settings}.items() if k not in SEARCH_ONLY}


def policy_of(m: dict) -> dict:
    """The threshold policy in force for a manifest: configured, or set by a calibrate request."""
    s = m.get("settings") or {}
    base = {"policy": s.get("threshold_policy"), "ok_percentile": s.get("ok_percentile"),
            "ng_margin": s.get("ng_margin"), "ng_recall": s.get("ng_recall"),
            "max_false_reject": s.get("max_false_reject", 0.05)}
    if m["threshold"]["method"] == "manual_override":
        return {"policy": "manual", "source": "calibrate"}
    if m.get("policy_override"):
        return {**base, **m["policy_override"], "source": "calibrate"}
    return {**base, "source": "config"}


_MASKS: dict[str, tuple[tuple[int, int], str | None]] = {}  # path -> ((mtime_ns, size), problem), bounded below


def mask_problem(path: Path) -> str | None:
    """Why mask.png cannot be used (None: it can, or there is none). Decoded once per change of the file, so
    a state read from disk (CLI `models`, /models, the page) never claims a mask that was not checked; the
    file itself is quarantined by the ROI's next load (RoiStore.load_mask)."""
    try:
        st = path.stat()
    except OSError:
        return None
    sig = (st.st_mtime_ns, st.st_size)
    hit = _MASKS.get(str(path))
    if hit is not None and hit[0] == sig:
        return hit[1]
    problem = read_mask(path)[1]  # the load's own check (RoiStore.load_mask)
    if len(_MASKS) > 4096:
        _MASKS.clear()
    _MASKS[str(path)] = (sig, problem)
    return problem


def disk_state(store: RoiStore, m: dict) -> dict:
    """The public state of a ROI read from disk beside the worker: the mask checked, not only present."""
    problem = mask_problem(store.mask_path)
    if problem:
        m = {**m, "mask_error": f"{problem}; it is quarantined at the ROI's next load and the ROI scored over the "
                                "whole image"}
    return manifest_state(m, store.mask_path.exists() and problem is None, RoiVersions(store).versions())


def manifest_state(m: dict, has_mask: bool, versions: list[int] | None = None) -> dict:
    """The public state of a ROI (MQTT `state` topic, CLI `models`) from its manifest."""
    return {"role_id": m["role_id"], "roi_id": m["roi_id"], "model_version": m["version"],
            "samples": {"ok": m["counts"]["ok"], "ng": m["counts"]["ng"]},
            "bank_size": m["counts"]["bank"], "patches": m["counts"]["patches"],
            "threshold": m["threshold"]["value"], "threshold_method": m["threshold"]["method"],
            "threshold_details": m["threshold"]["details"], "threshold_policy": policy_of(m), "backbone": m["backbone"],
            "branches": [{"name": b["identity"]["name"], "resolution": b["identity"]["resolution"],
                          "bank": b.get("bank")} for b in m.get("branches", [])],
            "has_mask": has_mask, **({"mask_error": m["mask_error"]} if m.get("mask_error") and not has_mask else {}),
            "suspect_samples": m.get("suspect_samples", []), "versions": versions or [],
            **({"fusion": _fusion_state(m["fusion"])} if m.get("fusion") else {}),
            **({"ng_rank": _ng_rank_state(m["ng_rank"])} if m.get("ng_rank") else {}),
            "change": m.get("change"), **({"rollback_of": m["rollback_of"]} if "rollback_of" in m else {}),
            **({"recovered": m["recovered"]} if m.get("recovered") else {}), "warnings": threshold_warnings(m),
            "updated_utc": m["updated_utc"]}


def _fusion_state(f: dict) -> dict:
    """Which branches the ROI fuses and why (core/roi/tuning.py), as the state says it."""
    keep = ("active", "names", "by", "changed", "previous", "gain", "wins", "ok_samples", "ng_samples",
            "proxy_images", "candidates")
    return {k: f[k] for k in keep if k in f}


def _ng_rank_state(r: dict) -> dict:
    """Whether the ROI's NG samples rank its parts, not only place its threshold (core/roi/ng_ranking.py)."""
    return {k: r[k] for k in ("form", "reason", "cv_auroc_gain", "ng_samples", "decided_at") if k in r}


NG_RECALL_WARN = 0.9  # fewer of the ROI's own NG samples over the threshold than this: said in the state
OK_REJECT_WARN = 0.05  # more of its OK samples' leave-one-out scores over the threshold than this: said too


def threshold_warnings(m: dict) -> list[dict]:
    """What the threshold in force does to the ROI's own labelled samples, when a line would not accept it:
    NG samples it lets pass (low recall), or OK samples it would reject. Without this only the threshold's
    details (`separable: false`) said that a calibration with NG samples had raised the false rejects."""
    th = (m.get("threshold") or {}).get("value")
    if th is None:
        return []
    out = []
    ng, ok = [float(x) for x in m.get("ng_scores", [])], [float(x) for x in m.get("ok_scores", [])]
    passing = sum(1 for x in ng if x <= th)
    if ng and 1 - passing / len(ng) < NG_RECALL_WARN:
        out.append({"code": "ng_recall_low", "recall": round(1 - passing / len(ng), 4),
                    "message": f"{passing} of the ROI's {len(ng)} NG samples score at or below the threshold "
                               f"{th:.4g}: parts with those defects would pass"})
    d = (m.get("threshold") or {}).get("details") or {}
    if d.get("separable") is False and d.get("ng_passing"):  # held at the false-reject limit
        limit = float(d.get("max_false_reject", 0.05))
        out.append({"code": "ng_pass_at_reject_limit", "passing": int(d["ng_passing"]), "max_false_reject": limit,
                    "message": f"OK and NG scores overlap: {d['ng_passing']} of the ROI's {len(ng)} NG samples pass at "
                               f"the threshold {th:.4g}, which rejects at most {limit:.0%} of its OK samples "
                               f"(max_false_reject)"})
    flagged = sum(1 for x in ok if x > th)
    if flagged >= 2 and flagged / len(ok) > OK_REJECT_WARN:  # one sample over a 99th percentile is expected
        out.append({"code": "ok_rejects_high", "share": round(flagged / len(ok), 4),
                    "message": f"{flagged} of the ROI's {len(ok)} OK samples (leave-one-out) score above the "
                               f"threshold {th:.4g}: good parts like them would be rejected"})
    return out


def stored_rois(data_root: Path) -> list[tuple[dict, dict]]:
    """(manifest, public state) of every ROI with a usable model on disk (a manifest that fails its schema is
    in `unusable_rois`). Read-only, safe beside the worker: manifests are written atomically."""
    out = []
    for role, roi in list_rois(data_root):
        store = RoiStore(data_root, role, roi)
        manifest = store.read_manifest()
        if manifest:
            out.append((manifest, disk_state(store, manifest)))
    return out


def recovered_manifest(store: RoiStore, versions: RoiVersions, fresh: dict) -> dict:
    """`fresh` (a new manifest); when a manifest.json was there but could not be used (not JSON, or failing
    its schema: hand-edited, truncated, crafted), that file goes to quarantine/files/ first and the model is
    rebuilt from the stored samples, numbered after the kept versions (so none is overwritten)."""
    if store.manifest_path.exists():
        reason = store.manifest_error or "manifest.json could not be used"
        moved = store.quarantine_file(store.manifest_path, reason)
        fresh["version"] = max(versions.versions(), default=0)
        fresh["recovered"] = {"reason": reason, "quarantined": str(moved.relative_to(store.root)),
                              "timestamp_utc": utc_now()}
        log.error("ROI %s/%s: %s; rebuilt from its stored samples (threshold set again by its policy)",
                  store.role_id, store.roi_id, reason)
    return fresh


def unusable_rois(data_root: Path) -> list[dict]:
    """Every ROI whose manifest.json exists but cannot be used, with the reason and what happens next: the
    shape a ROI has in /models, the CLI `models`, the MQTT state topic and the page while it is unloadable."""
    return [state for role, roi in list_rois(data_root) if (state := _unusable(RoiStore(data_root, role, roi)))]


def _unusable(store: RoiStore) -> dict | None:
    if store.read_manifest() is not None or not store.manifest_error:
        return None
    ok = store.samples_dir("ok")
    return unloadable_state(store.role_id, store.roi_id, store.manifest_error,
                            ok.is_dir() and any(True for _ in ok.glob("*.json")))


class ManifestWatch:
    """`unusable_rois` for callers that ask often (/health every second from the OPC UA server, MQTT, HTTP):
    a manifest is parsed again only when its size or mtime changed, so a station with a thousand ROIs
    costs one directory listing and a stat per ROI, not a thousand schema checks."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = Path(data_root)
        self._seen: dict[tuple[str, str], tuple[tuple[int, int], dict | None]] = {}

    def unusable(self) -> list[dict]:
        seen, out = {}, []
        for role, roi in list_rois(self.data_root):
            store = RoiStore(self.data_root, role, roi)
            try:
                st = store.manifest_path.stat()
            except OSError:
                continue
            sig = (st.st_mtime_ns, st.st_size)
            prev = self._seen.get((role, roi))
            state = prev[1] if prev is not None and prev[0] == sig else _unusable(store)
            seen[(role, roi)] = (sig, state)
            if state:
                out.append(state)
        self._seen = seen  # replaced whole: readers in other threads see the old or the new one
        return out


def unloadable_state(role_id: str, roi_id: str, reason: str, rebuildable: bool | None = None) -> dict:
    then = ("its manifest is quarantined and the model rebuilt from its stored samples at its next request"
            if rebuildable else "requests to it are answered roi_unloadable until the files are repaired or removed"
            if rebuildable is None else "its manifest is quarantined at its next request; it has no stored OK "
            "samples to rebuild from, so it starts again unfitted")
    return {"role_id": role_id, "roi_id": roi_id, "unloadable": {"reason": reason, "then": then}}


def threshold_policy(m: dict, s: ModelSettings) -> ThresholdPolicy:
    """The config's policy, with what a calibrate request set (it outlives later fits)."""
    over = m.get("policy_override") or {}
    if s.threshold_policy == "manual" and not over:
        return ThresholdPolicy("manual", manual_value=s.threshold_value)
    return ThresholdPolicy(over.get("policy", s.threshold_policy), over.get("ok_percentile", s.ok_percentile),
                           over.get("ng_margin", s.ng_margin), over.get("ng_recall", s.ng_recall),
                           max_false_reject=s.max_false_reject)


def apply_calibration(m: dict, policy: str | None, value: float | None, ok_percentile: float | None,
                      ng_margin: float | None, ng_recall: float | None, source: str | None = None) -> None:
    """Record a calibrate request (checked by thresholds.check_calibration) in the manifest: a manual
    override, a policy kept for later fits, or back to the config; None: the threshold is only recomputed."""
    if policy == "manual" and value is not None:  # with its provenance: who set it, when, over what
        details = {"set_by": source, "previous": m["threshold"]["value"], "set_utc": utc_now()} if source else {}
        m["threshold"] = {"value": float(value), "method": "manual_override", "details": details}
    elif policy is not None:
        m["threshold"] = {"value": None, "method": "none", "details": {}}
        m.pop("policy_override", None)
        if policy != "config":
            over = {"policy": policy, "ok_percentile": ok_percentile, "ng_margin": ng_margin, "ng_recall": ng_recall}
            m["policy_override"] = {k: v for k, v in over.items() if v is not None}


def check_manual_threshold(m: dict, value: float) -> None:
    """InputError invalid_threshold when a manual threshold lies outside threshold_range(m)."""
    low, high, why = threshold_range(m)
    if not low <= value <= high:
        raise InputError(f"threshold {value:.6g} is outside {low:.4g}..{high:.4g}: {why}", code="invalid_threshold")


def threshold_range(m: dict) -> tuple[float, float, str]:
    """(low, high, why) a manual threshold (any ingress; the CLI's --allow-out-of-range aside) must lie in: from
    half the lowest to twice the highest of the ROI's own calibration scores (OK leave-one-out and NG), so that a
    slip of the hand (or a crafted post) cannot set a value that rejects every part or passes every one (1e308)."""
    scores = [float(x) for x in [*m.get("ok_scores", []), *m.get("ng_scores", [])]]
    current = (m.get("threshold") or {}).get("value")
    if not scores:
        return 0.0, float("inf"), "the ROI has no calibration scores yet"
    low, high = 0.5 * min(scores), 2.0 * max(scores)
    if current is not None:
        low, high = min(low, float(current)), max(high, float(current))
    why = (f"the ROI's {len(m.get('ok_scores', []))} OK and {len(m.get('ng_scores', []))} NG calibration scores lie "
           f"in {min(scores):.4g}..{max(scores):.4g}; further out a threshold rejects every part or passes every "
           "one (the CLI's `calibrate --threshold V --allow-out-of-range` sets it if that is really meant)")
    return low, high, why
