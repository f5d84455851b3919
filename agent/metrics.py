"""Prometheus metrics (prometheus-client), fed by the worker's result observers; served at GET /metrics.

One registry per agent (not the library's global one), so several agents in one process (tests) do
not collide. Names are part of the public contract: docs/protocol.md lists them.
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from agent.jobs import Job, Outcome
from agent.runtime import Runtime
from agent.worker import Worker
from core.roi.model import stored_rois

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
STAGES = ("decode", "preprocess", "backbone", "knn", "postprocess")


class Metrics:
    def __init__(self, rt: Runtime, worker: Worker, data_root: Path) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("anomaly_agent_requests", "Requests answered, by ingress, action, status and "
                                "error code ('' when ok)", ["ingress", "action", "status", "code"], registry=r)
        self.stage = Histogram("anomaly_agent_inference_stage_seconds", "Time per prediction and pipeline stage",
                               ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.inference = Histogram("anomaly_agent_inference_seconds", "Inference time per prediction "
                                   "(decode to result, without queueing)", buckets=STAGE_BUCKETS, registry=r)
        self.latency = Histogram("anomaly_agent_request_seconds", "Time from enqueue to result, by ingress and "
                                 "action", ["ingress", "action"], buckets=REQUEST_BUCKETS, registry=r)
        self.batch = Histogram("anomaly_agent_batch_size", "Backbone batch size each prediction ran in",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.patches = Counter("anomaly_agent_knn_patches", "Patches of predictions, by how the search ran "
                               "(certified: the exact search only where it decides)", ["mode"], registry=r)
        self.searched = Counter("anomaly_agent_knn_patches_searched", "Patches of predictions searched exactly, by "
                                "how the search ran", ["mode"], registry=r)
        self.anomalies = Counter("anomaly_agent_anomalies", "Predictions flagged anomalous", ["role_id", "roi_id"],
                                 registry=r)
        self.samples = Gauge("anomaly_agent_samples", "Stored samples per ROI", ["role_id", "roi_id", "kind"],
                             registry=r)
        self.threshold = Gauge("anomaly_agent_threshold", "Decision threshold per ROI", ["role_id", "roi_id"],
                               registry=r)
        self.drift = Gauge("anomaly_agent_drift_state", "Drift per ROI: 0 ok, 1 warning, 2 alarm",
                           ["role_id", "roi_id"], registry=r)
        self.margin = Gauge("anomaly_agent_drift_margin_used", "Median recent OK score as a share of the way from "
                            "the usual OK score to the threshold", ["role_id", "roi_id"], registry=r)
        self.ng_rate = Gauge("anomaly_agent_recent_ng_rate", "NG rate of the drift window", ["role_id", "roi_id"],
                             registry=r)
        self.rt = rt
        queue = Gauge("anomaly_agent_queue_depth", "Jobs waiting for the worker", registry=r)
        queue.set_function(worker.depth)
        ex = rt.extractor
        Info("anomaly_agent_backbone", "Backbone and device", registry=r).info(
            {"device": str(ex.device), "backbone": ex.name, "resolution": str(ex.identity.to_dict().get("resolution"))})
        for _, state in stored_rois(data_root):
            self._set_state(state)

    def _set_state(self, state: dict) -> None:
        role, roi = state["role_id"], state["roi_id"]
        for kind in ("ok", "ng"):
            self.samples.labels(role, roi, kind).set(state["samples"][kind])
        if state.get("threshold") is not None:
            self.threshold.labels(role, roi).set(state["threshold"])

    def observe(self, job: Job, outcome: Outcome) -> None:
        """A worker observer: one call per finished job."""
        result = outcome.result
        code = result["error"]["code"] if result["status"] == "error" else ""
        self.requests.labels(job.ingress, job.action, result["status"], code).inc()
        if job.enqueued_at:
            self.latency.labels(job.ingress, job.action).observe(time.perf_counter() - job.enqueued_at)
        data = result.get("data") or {}
        if result["status"] != "ok":
            return
        if job.action == "predict":
            for stage in STAGES:
                if stage in data.get("timings_ms", {}):
                    self.stage.labels(stage).observe(data["timings_ms"][stage] / 1000)
            self.inference.observe(data["inference_ms"] / 1000)
            self.batch.observe(data["batch_size"])
            if outcome.search is not None:
                self.patches.labels(outcome.search.mode).inc(outcome.search.patches)
                self.searched.labels(outcome.search.mode).inc(outcome.search.searched)
            if data["is_anomaly"]:
                self.anomalies.labels(job.role_id, job.roi_id).inc()
            self._set_drift(job.role_id, job.roi_id)
        elif "samples" in data:
            self._set_state({"role_id": job.role_id, "roi_id": job.roi_id, **data})

    def _set_drift(self, role: str, roi: str) -> None:
        d = self.rt.drift.current(role, roi)
        if not d:
            return
        self.drift.labels(role, roi).set(("ok", "warning", "alarm").index(d["state"]))
        if d.get("margin_used") is not None:
            self.margin.labels(role, roi).set(d["margin_used"])
        self.ng_rate.labels(role, roi).set(d["ng_rate"])

    def rejected(self, ingress: str, action: str, code: str) -> None:
        """A request refused before it reached the worker (queue full, bad fields, auth)."""
        self.requests.labels(ingress, action, "error", code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
