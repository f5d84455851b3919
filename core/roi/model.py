"""PatchCore model of one (role_id, roi_id): fit_ok, send_ng, predict, thresholds, persistence.

The parts: stored samples (core/roi/sample_store.py), every branch's index and coreset bank
(core/roi/index.py), the manifest and settings (core/roi/manifest.py), the threshold policy
(core/method/thresholds.py) and the samples' threshold scores (core/roi/sample_scores.py); a prediction is a
`Prediction` (core/prediction.py). This class ties them together for one ROI.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from core.backbones import FeatureExtractor
from core.errors import BackboneMismatchError, InputError, ModelNotReadyError
from core.image_io import ImageInput
from core.method import thresholds
from core.method.branch import Branch
from core.method.fusion import BranchScale
from core.method.scorer import Scorer
from core.prediction import Prediction
from core.roi import ng_ranking, tuning
from core.roi.index import Embedded, RoiIndex
from core.roi.lifecycle import (
    LifecycleSettings,
    apply_suspect_policy,
    check_ng_room,
    find_ng_suspects,
    find_suspects,
    finish_pending,
    label_conflicts,
    prune_trash,
)
from core.roi.manifest import (
    ModelSettings,
    apply_calibration,
    check_manual_threshold,
    manifest_state,
    new_manifest,
    policy_of,
    recovered_manifest,
    result_settings,
    stored_rois,
    threshold_policy,
)
from core.roi.predict import Verdict, predict_one
from core.roi.sample_scores import SampleScorer, nuisance_maps
from core.roi.sample_store import Sample, SampleStore
from core.roi.versions import RoiVersions, clear_pending
from core.storage import RoiStore, utc_now

log = logging.getLogger(__name__)

__all__ = ["Embedded", "ModelSettings", "Prediction", "RoiModel", "manifest_state", "policy_of", "stored_rois"]


class RoiModel:
    """Samples, branches (index + bank each), fusion and threshold of one ROI; one worker owns it (not thread-safe)."""

    def __init__(self, data_root: Path, role_id: str, roi_id: str, extractor: FeatureExtractor,
                 settings: ModelSettings | None = None, progress: Callable[[], None] | None = None,
                 lifecycle: LifecycleSettings | None = None) -> None:
        # progress: called between long steps (index rebuild, fits, scoring): a watchdog sees busy, not hung
        self.progress = progress or (lambda: None)
        self.store = RoiStore(Path(data_root), role_id, roi_id)
        self.extractor = extractor
        self.settings = settings or ModelSettings()
        self.lifecycle = lifecycle or LifecycleSettings()
        self.identity = extractor.identity.to_dict()
        self.versions = RoiVersions(self.store, self.lifecycle.versions_kept)
        self.open()

    def open(self) -> None:
        """Load (or reload, after a rollback or delete) everything from disk; a lifecycle operation a kill
        interrupted is finished first, so the model is the old version or the new one, never a mix."""
        t0 = time.perf_counter()
        self.index = RoiIndex(self.store, self.extractor, self.settings, self.progress)
        self.samples = SampleStore(self.store, self.index.bytes_needed, self.progress)
        self.samples.draft_for = self.extractor.input_size
        self._dirty = False
        pending = finish_pending(self)
        self.manifest = self.store.read_manifest() or recovered_manifest(
            self.store, self.versions, new_manifest(self.store.role_id, self.store.roi_id, self.identity,
                                                    asdict(self.settings)))
        mask, mask_error = self.store.load_mask()
        scales = [BranchScale(**x) for x in self.manifest.get("branch_scales", [])]
        fusion = tuning.current(self.manifest.get("fusion"), self.settings.branch_select, len(self.branches))
        self.scorer = Scorer(self.branches, self.settings, mask, scales, fusion["active"])
        self._samples_scorer = SampleScorer(self.scorer.branch_map, self.scorer.map_score, self.progress)
        self._view_cache: dict = {}  # the OK evidence of the last tuning (core/roi/tuning.py)
        if mask_error:
            self.manifest["mask_error"] = mask_error
        # a delete's cause (delete, reset, relabel, a refused suspect) is what the new version records
        change = str(pending.get("change", "delete")) if pending and pending["op"] == "delete" else "rebuild"
        self._sync_index(change, force_threshold=bool(mask_error))
        if ng_ranking.restore(self.manifest, self.index, self.scorer):  # the record no longer fits: decide again
            self._update_threshold_and_save("rebuild")
        if pending is not None:
            if pending["op"] == "rollback":
                self.snapshot()
            clear_pending(self.store)
            prune_trash(self)  # a delete, relabel or rollback filled the trash: keep it bounded
        if self.store.manifest_path.exists() and self.version not in self.versions.versions():
            self.snapshot()  # an imported ROI, or one written before versions were kept: its first change can be undone
        log.info("ROI %s/%s loaded: %d OK, %d NG samples, banks %s patches, threshold %s (%.0f ms)",
                 self.store.role_id, self.store.roi_id, self.manifest["counts"]["ok"], self.manifest["counts"]["ng"],
                 [len(b) for b in self.branches], self.manifest["threshold"]["value"],
                 (time.perf_counter() - t0) * 1000)

    # ------------------------------------------------------------------ state
    @property
    def branches(self) -> list[Branch]:
        return self.index.branches

    @property
    def mask(self) -> np.ndarray | None:
        return self.scorer.mask

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def threshold(self) -> float | None:
        return self.manifest["threshold"]["value"]

    def _count(self, kind: str) -> int:
        return len(self.index.entries(kind))

    def state(self) -> dict:
        return manifest_state(self.manifest, self.mask is not None, self.versions.versions())

    def policy(self) -> dict:  # the threshold policy in force
        return policy_of(self.manifest)

    # ------------------------------------------------------------ the index
    def _sync_index(self, change: str, force_threshold: bool = False) -> None:
        """Make every branch's embedding index and bank match the stored samples and the features."""
        m = self.manifest
        previous = m.get("branches") or [{"identity": m.get("backbone"), "bank_rows_total": m.get("bank_rows_total")}]
        self.index.sync(self.samples, previous, m.get("bank_key") == self.settings.bank_key())
        changed = (m["counts"]["ok"] != self._count("ok") or m["backbone"] != self.identity
                   or m["counts"]["ng"] != self._count("ng")
                   or result_settings(m.get("settings")) != result_settings(asdict(self.settings))
                   or [x["identity"] for x in m.get("branches", previous)] != [b.identity for b in self.branches]
                   or len(self.scorer.scales) != len(self.branches))
        if (changed or force_threshold) and (self.index.rows("ok") or self.store.exists()):
            self._update_threshold_and_save(change)

    # --------------------------------------------------------------- scoring
    def _update_threshold_and_save(self, change: str) -> None:
        """Score the stored samples, decide the threshold and write the next version; `change`: its cause."""
        s = self.settings
        ok_scores, ng_scores, m = [], [], self.manifest
        fusion = tuning.current(m.get("fusion"), s.branch_select, len(self.branches))
        if self.index.ready:
            arrays = {"ok": self.index.arrays("ok"), "ng": self.index.arrays("ng")}
            nuisance = lambda: nuisance_maps(self.index, self.store, self.scorer.branch_map)  # noqa: E731
            ok_scores, ng_scores, self.scorer.scales = self._samples_scorer.round(
                self.branches, s.holdout_max, arrays, nuisance, fusion["active"])
            if s.branch_select == "auto":
                fusion = tuning.retune(self.index, self.store, self._samples_scorer, fusion,
                                       self.scorer.distances_score, self.progress, self._view_cache, self.lifecycle)
                ok_scores, ng_scores = self._samples_scorer.fuse(fusion["active"])
        self.scorer.active = fusion["active"]
        ng_suspects = find_ng_suspects(*self._samples_scorer.plain_scores(self.index.ready), self.lifecycle)
        ng_rank, self.scorer.ng, ok_scores, ng_scores = ng_ranking.decide(
            s.ng_rank if self.index.ready else "off", self._samples_scorer, ok_scores, ng_scores, fusion["active"],
            self.branches, f"{self.store.role_id}/{self.store.roi_id}", {x["sample_id"] for x in ng_suspects}, m)
        th = m["threshold"] if m["threshold"]["method"] == "manual_override" else threshold_policy(m, s).decide(
            ok_scores, ng_scores)
        scored = self._samples_scorer.by_sample if self.index.ready else {}
        by_sample = {k: {sid: round(x, 6) for sid, x in scored.get(k, {}).items()} for k in ("ok", "ng")}
        m.update(version=m["version"] + 1, backbone=self.identity, settings=asdict(s), threshold=th,
                 bank_key=s.bank_key(), bank_rows_total=self.index.rows("ok"), updated_utc=utc_now(),
                 ok_scores=[round(x, 6) for x in ok_scores], ng_scores=[round(x, 6) for x in ng_scores],
                 branches=self.index.info(), branch_scales=[x.to_dict() for x in self.scorer.scales], change=change,
                 sample_scores=by_sample, fusion=fusion, ng_rank=ng_rank,
                 suspect_samples=find_suspects(by_sample["ok"], th.get("value"), self.lifecycle) + ng_suspects,
                 counts={"ok": self._count("ok"), "ng": self._count("ng"), "bank": len(self.branches[0]),
                         "patches": self.index.rows("ok")})
        m.pop("rollback_of", None)
        if change != "rebuild":
            m.pop("recovered", None)  # said in the state until the ROI next changes
        self.store.write_manifest(m)
        self.snapshot()

    def snapshot(self) -> None:
        """Keep this manifest version (core/roi/versions.py) so that it can be rolled back to."""
        self.versions.snapshot(self.manifest, [b.bank_path for b in self.branches], self.index.sample_ids())

    # --------------------------------------------------------------- public
    def fit_ok(self, samples: list[Sample], finalize: bool = True, relabel: bool = False) -> dict:
        """Store OK samples (image bytes + JSON), extend the bank, update the threshold; finalize=False: the
        threshold waits for one `finalize()` after several calls (`fit_ok_in_steps`)."""
        t0 = time.perf_counter()
        label_conflicts(self, "ok", samples, relabel)
        stored = self.samples.add("ok", samples)
        t_backbone, t_coreset = self.index.extend_banks(stored.records, stored.images)
        self._dirty = self._dirty or bool(stored.records)
        tt = time.perf_counter()
        if finalize:
            self.finalize()
        t_threshold, t_total = time.perf_counter() - tt, time.perf_counter() - t0
        report = {**stored.report(), **self.state(), "timings_ms": {
            k: round(v * 1000, 1) for k, v in (("embed", t_backbone), ("coreset", t_coreset),
                                                ("threshold", t_threshold), ("total", t_total))}}
        log.info("fit_ok %s/%s: +%d samples (%d duplicates), banks %s, threshold %s, device %s, timings %s",
                 self.store.role_id, self.store.roi_id, len(stored.records), len(stored.duplicates),
                 [len(b) for b in self.branches], self.threshold, self.extractor.device, report["timings_ms"])
        return apply_suspect_policy(self, report) if finalize else report

    def fit_ok_in_steps(self, chunks: Iterable[list[Sample]], between: Callable[[], None] = lambda: None,
                        relabel: bool = False) -> dict:
        """A large fit_ok in chunks (decoded as they come: bounded memory), `between()` after each (e.g. other
        ROIs' predictions); the threshold once at the end. Same bank as one call: selection is per sample."""
        reports = []
        for chunk in chunks:
            reports.append(self.fit_ok(chunk, finalize=False, relabel=relabel))
            between()
        t0 = time.perf_counter()
        self.finalize()
        timings = Counter(dict.fromkeys(("threshold", "total"), (time.perf_counter() - t0) * 1000))
        for rep in reports:
            timings.update(rep["timings_ms"])
        return apply_suspect_policy(self, {
            **{k: [x for rep in reports for x in rep[k]] for k in ("added", "duplicates", "stored", "ids")},
            **self.state(), "timings_ms": {k: round(v, 1) for k, v in timings.items()}, "steps": len(reports)})

    def finalize(self) -> None:
        """After fit_ok(finalize=False) calls: rebuild the search index, threshold and manifest."""
        if self._dirty:
            self.index.refresh_knn()
            self._update_threshold_and_save("fit_ok")
            self._dirty = False

    def send_ng(self, samples: list[Sample], relabel: bool = False) -> dict:
        """Store NG calibration samples and recalibrate the threshold (policy auto)."""
        t0 = time.perf_counter()
        label_conflicts(self, "ng", samples, relabel)
        check_ng_room(self, len(samples), self.lifecycle)
        stored = self.samples.add("ng", samples)
        t1 = t2 = time.perf_counter()
        if stored.records:
            self.index.append("ng", stored.records, stored.images)
            t2 = time.perf_counter()
            if self.index.ready:
                self._update_threshold_and_save("send_ng")
            else:
                self.manifest["counts"]["ng"] = self._count("ng")
                self.store.write_manifest(self.manifest)
        t3 = time.perf_counter()
        timings = {k: round(v * 1000, 1) for k, v in (("embed", t2 - t1), ("threshold", t3 - t2), ("total", t3 - t0))}
        log.info("send_ng %s/%s: +%d samples (%d duplicates), threshold %s, timings %s", self.store.role_id,
                 self.store.roi_id, len(stored.records), len(stored.duplicates), self.threshold, timings)
        return apply_suspect_policy(self, {**stored.report(), **self.state(), "timings_ms": timings})

    def set_threshold(self, value: float | None) -> dict:  # a manual override, or back to the policy (None)
        return self.calibrate("manual" if value is not None else "config", value)

    def calibrate(self, policy: str | None = None, value: float | None = None, ok_percentile: float | None = None,
                  ng_margin: float | None = None, ng_recall: float | None = None, source: str | None = None,
                  out_of_range: bool = False) -> dict:
        """Recompute the threshold from the stored OK/NG samples. policy None: again with the current policy;
        "auto" (NG-calibrated when NG samples exist, else OK percentile) or "ok_only", with their parameters,
        kept for later fits; "manual" with `value`: a fixed override within the range the ROI's scores allow
        (out_of_range: any, the CLI's explicit flag); "config": back to the configured policy."""
        thresholds.check_calibration(policy, value, ok_percentile, ng_margin, ng_recall)
        if policy == "manual" and value is not None and not out_of_range:
            check_manual_threshold(self.manifest, value)
        apply_calibration(self.manifest, policy, value, ok_percentile, ng_margin, ng_recall, source)
        if not self.index.ready and policy != "manual":
            raise ModelNotReadyError(
                f"ROI {self.store.role_id}/{self.store.roi_id} has no fitted model: send fit_ok samples first")
        self._update_threshold_and_save("calibrate")
        return self.state()

    def set_mask(self, png: bytes) -> dict:
        mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
        if mask is None or not (mask > 0).any():
            raise InputError("mask must be a PNG with non-zero pixels where anomalies count", code="invalid_mask")
        self.store.save_mask(png)
        self.manifest.pop("mask_error", None)
        self.scorer.set_mask(mask > 0)
        self._samples_scorer.clear()  # scores depend on the mask
        if self.index.ready:
            self._update_threshold_and_save("mask")
        return self.state()

    def predict(self, images: list[ImageInput], heatmap: bool = False, return_map: bool = False,
                preview_px: int = 0) -> list[Prediction]:
        """Score images (batched by size); one Prediction per image, in order.

        preview_px > 0 adds `preview`: a thumbnail of the image, map and mask (heatmap.thumbnail) so a
        heatmap can be drawn later without the cost of a full-size one on every prediction.
        """
        threshold = self.threshold
        if not self.index.ready or threshold is None:
            raise ModelNotReadyError(
                f"ROI {self.store.role_id}/{self.store.roi_id} has no fitted model: send fit_ok samples first")
        if not self.index.matches_extractor():
            raise BackboneMismatchError("the running backbone differs from the one this bank was built with")
        verdict = Verdict(float(threshold), self.manifest["threshold"]["method"], self.version, self.identity,
                          str(self.extractor.device), self.settings.min_defect_area_px)
        return [predict_one(self.scorer, img, emb, verdict, heatmap, return_map, preview_px)
                for img, emb in zip(images, self.index.embed(images, self.scorer.active), strict=True)]
