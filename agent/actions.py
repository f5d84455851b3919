"""What the worker does with a batch of jobs of one ROI and action: predict, fit_ok / send_ng, calibrate.

Every job ends in exactly one call of `finish(job, outcome)`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.jobs import Job, Outcome, error_result, ok_result
from agent.runtime import Runtime
from core.errors import AnomalyError, InputError
from core.image_io import ImageInput
from core.method.thresholds import requested_policy
from core.prediction import SearchStats
from core.roi import lifecycle
from core.roi.model import RoiModel

log = logging.getLogger(__name__)
LIFECYCLE = ("delete_samples", "rollback", "reset")
FIT_STEP = 8  # images per step of a large fit_ok; waiting predictions of other ROIs are answered between steps


@dataclass
class ActionSettings:
    """Set by the transports and the daemon, read by the actions."""

    preview_px: int = 0  # > 0: predictions carry a thumbnail for observers (operator page)
    always_heatmap: bool = False  # debug: every prediction renders its heatmap (for the debug files)
    on_state: Callable[[str, str, dict], None] | None = None  # a ROI's state changed (MQTT state topic)
    last_timing: dict = field(default_factory=dict)  # of the last prediction (health)


class Actions:
    def __init__(self, rt: Runtime, settings: ActionSettings, finish: Callable[[Job, Outcome], None],
                 heartbeat: Callable[[], None], serve_others: Callable[[tuple[str, str]], None]) -> None:
        self.rt = rt
        self.settings = settings
        self.finish = finish
        self.heartbeat = heartbeat
        self.serve_others = serve_others

    def fail(self, job: Job, code: str, message: str) -> None:
        self.finish(job, Outcome(error_result(job, code, message)))

    def run(self, model: RoiModel, batch: list[Job]) -> None:
        action = batch[0].action
        if action == "predict":
            self.predict(model, batch)
        elif action in ("fit_ok", "send_ng"):
            self.fit(model, batch, "ok" if action == "fit_ok" else "ng")
        elif action == "calibrate":
            if any(j.images for j in batch):  # NG images sent with calibrate (a burst of them: one change)
                self.fit(model, [j for j in batch if j.images], "ng")
            for j in batch:
                if j.images:
                    continue
                try:
                    p = j.params
                    policy = requested_policy(p.policy, p.threshold, p.reset)
                    state = model.calibrate(policy, p.threshold, p.ok_percentile, p.ng_margin, p.ng_recall,
                                            source=f"{j.ingress}: {p.source} (request {j.request_id})")
                except AnomalyError as exc:
                    self.fail(j, exc.code, exc.message)
                    continue
                self.finish(j, Outcome(ok_result(j, state)))
                self.state_changed(model)
        elif action in LIFECYCLE:
            for j in batch:
                self.lifecycle(model, j)
        else:
            for j in batch:
                self.fail(j, "unknown_action", f"unknown action {action!r}")

    def lifecycle(self, model: RoiModel, j: Job) -> None:
        """delete_samples, rollback, reset: each a new version of the ROI (core/roi/lifecycle.py)."""
        try:
            if j.action == "delete_samples":
                data = lifecycle.delete_samples(model, lifecycle.ids_from(j.params.sample_ids),
                                                f"deleted by request {j.request_id} ({j.params.source})")
            elif j.action == "rollback":
                data = lifecycle.rollback(model, j.params.version)
            else:
                data = lifecycle.reset_roi(model)
        except AnomalyError as exc:
            self.fail(j, exc.code, exc.message)
            return
        self.rt.drift.forget(j.role_id, j.roi_id)  # another model: the recent scores no longer compare
        self.finish(j, Outcome(ok_result(j, data)))
        self.state_changed(model)

    def _decode(self, job: Job, data: bytes) -> tuple[ImageInput, float]:
        t0 = time.perf_counter()
        img = self.rt.decode(data, job.params.mm_per_px, (job.role_id, job.roi_id))
        return img, (time.perf_counter() - t0) * 1000

    def predict(self, model: RoiModel, batch: list[Job]) -> None:
        ready: list[tuple[Job, ImageInput, float]] = []
        for j in batch:
            try:
                img, ms = self._decode(j, j.images[0])
                ready.append((j, img, ms))
            except AnomalyError as exc:
                self.fail(j, exc.code, exc.message)
        if not ready:
            return
        default = self.rt.heatmap_default(batch[0].role_id, batch[0].roi_id)
        wants = {j: (j.params.heatmap if j.params.heatmap is not None else default) for j, _, _ in ready}
        try:
            heatmap = self.settings.always_heatmap or any(wants.values())
            preds = model.predict([img for _, img, _ in ready], heatmap=heatmap, preview_px=self.settings.preview_px)
        except AnomalyError as exc:
            for j, _, _ in ready:
                self.fail(j, exc.code, exc.message)
            return
        for (j, _, decode_ms), pred in zip(ready, preds, strict=True):
            pred.add_decode(decode_ms)
            pred.queue_ms = (time.perf_counter() - j.enqueued_at) * 1000 - pred.inference_ms
            self.settings.last_timing = {"inference_ms": pred.inference_ms, "batch_size": pred.batch_size,
                                "device": pred.device}
            search = pred.search or SearchStats("exact", 0, 0)
            log.info("predict %s/%s %s: score %.4f threshold %.4f anomaly=%s %.1f ms (batch %d, %s; %s search "
                     "%d/%d patches)", j.role_id, j.roi_id, j.request_id, pred.score, pred.threshold, pred.is_anomaly,
                     pred.inference_ms, pred.batch_size, pred.device, search.mode, search.searched, search.patches)
            self.finish(j, Outcome(ok_result(j, pred.to_dict()), pred.heatmap_png, wants[j], pred.preview,
                                      pred.search))
            changed = self.rt.drift.observe(model, pred.score, pred.is_anomaly)
            if changed is not None:
                self.state_changed(model, changed)

    def fit(self, model: RoiModel, batch: list[Job], kind: str) -> None:
        samples, owners = [], []
        for j in batch:
            try:
                if not j.images:
                    raise InputError("no image in the request", code="missing_image")
                decoded = []
                for data in j.images:  # a 60-image upload decodes for seconds: keep the watchdog fed
                    self.heartbeat()
                    decoded.append(self._decode(j, data)[0])
            except AnomalyError as exc:
                self.fail(j, exc.code, exc.message)
                continue
            meta = {"source": j.params.source, "request_id": j.request_id}
            try:  # an image stored under the other label: refused, or moved with relabel=true
                lifecycle.label_conflicts(model, kind, [(d, i, meta) for d, i in zip(j.images, decoded, strict=True)],
                                          j.params.relabel)
            except AnomalyError as exc:
                self.fail(j, exc.code, exc.message)
                continue
            for data, img in zip(j.images, decoded, strict=True):
                samples.append((data, img, meta))
                owners.append(j)
        if not samples:
            return
        key = (batch[0].role_id, batch[0].roi_id)
        if kind == "ok" and len(samples) > FIT_STEP:
            steps = (samples[start : start + FIT_STEP] for start in range(0, len(samples), FIT_STEP))
            rep = model.fit_ok_in_steps(steps, lambda: self.serve_others(key))
        else:
            rep = model.fit_ok(samples) if kind == "ok" else model.send_ng(samples)
        state = {k: v for k, v in rep.items() if k not in ("added", "duplicates", "stored", "refused", "ids")}
        for j in dict.fromkeys(owners):  # each request counts its own images: stored now, or already stored
            mine = [new for o, new in zip(owners, rep["stored"], strict=True) if o is j]
            mine_ids = [sid for o, sid in zip(owners, rep.get("ids", []), strict=False) if o is j]
            refused = [sid for sid in rep.get("refused", []) if sid in mine_ids]
            repeats = len(j.images) - len({hashlib.sha256(d).digest() for d in j.images})  # the same bytes twice
            self.finish(j, Outcome(ok_result(j, {"added": sum(mine) - len(refused), "duplicates": len(mine) - sum(mine),
                                                 "duplicates_in_batch": repeats,
                                                 **({"refused": refused} if refused else {}), **state})))
        self.state_changed(model)

    def state_changed(self, model: RoiModel, drift: dict | None = None) -> None:
        if self.settings.on_state is not None:
            st = model.state()
            current = drift or self.rt.drift.current(st["role_id"], st["roi_id"])
            self.settings.on_state(st["role_id"], st["roi_id"], {**st, **({"drift": current} if current else {})})
