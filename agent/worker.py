"""The inference worker: one thread owns the models and the device; ingestion only enqueues.

Predicts for the same ROI that arrive within `max_wait_ms` are micro-batched (up to `max_batch`),
consecutive fit_ok jobs of one ROI are fitted together. Every job ends in exactly one call of its
`on_result` with an ok or error result; observers (metrics, the operator page's recent results) see
each result first, with the prediction's preview thumbnail.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import queue
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

from core.errors import AnomalyError, InputError
from core.thresholds import requested_policy

from .config import WorkerConfig
from .jobs import Job, error_result, ok_result
from .runtime import Runtime

log = logging.getLogger(__name__)
FIT_STEP = 8  # images per step of a large fit_ok; waiting predictions of other ROIs are answered between steps



def as_bool(value: object) -> bool:
    """A flag from outside: true/false, 1/0, and the strings "true"/"false"/"1"/"0"/"yes"/"no" ("false" is
    false, not a non-empty string)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)

class Worker:
    """Owns the backbone and the models. The runtime is built by the worker thread itself: PyTorch's
    OpenMP pool belongs to the thread that first runs parallel work, and a second thread's pool next
    to it made every forward a third slower on a 2-core CPU (docs/benchmarks.md, daemon overhead)."""

    def __init__(self, rt_factory: Callable[[], Runtime], cfg: WorkerConfig,
                 heartbeat: Callable[[], None] | None = None,
                 on_state: Callable[[str, str, dict], None] | None = None) -> None:
        self._rt_factory = rt_factory
        self.rt: Runtime
        self.cfg = cfg
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=cfg.queue_size)
        self.heartbeat = heartbeat or (lambda: None)
        self.on_state = on_state
        self.observers: list[Callable[[Job, dict, dict | None], None]] = []
        self._finished: weakref.WeakSet[Job] = weakref.WeakSet()  # jobs already answered (exactly once)
        self.preview_px = 0  # > 0: predictions carry a thumbnail for observers (operator page)
        self.counts: Counter[str] = Counter()
        self.last_timing: dict = {}
        self._stop = threading.Event()
        self._backlog: deque[Job] = deque()  # taken from the queue, not yet run: served before the queue
        self._thread = threading.Thread(target=self._main, name="worker", daemon=True)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.max_batch = 1
        self._open: dict[Job, float] = {}  # submitted, not yet answered -> when submitted (monotonic)
        self._open_lock = threading.Lock()
        self.intakes: dict[str, threading.Thread] = {}  # intake threads, watched by /health and the watchdog

    def start(self) -> Runtime:
        """Start the thread; returns once it has loaded and warmed the backbone (or re-raises its error)."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        return self.rt

    def _main(self) -> None:
        try:
            self.rt = self._rt_factory()
        except BaseException as exc:  # handed to start() in the main thread
            self._failure = exc
            self._ready.set()
            return
        mb = self.cfg.max_batch
        self.max_batch = (8 if self.rt.extractor.device.type == "cuda" else 1) if mb == "auto" else int(mb)
        log.info("worker: max batch %d on %s, queue %d", self.max_batch, self.rt.extractor.device,
                 self.cfg.queue_size)
        self._ready.set()
        self._run()

    def submit(self, job: Job, timeout: float | None = None) -> bool:
        """Enqueue (blocking while the queue is full: backpressure). False on timeout."""
        job.enqueued_at = time.perf_counter()
        try:
            self.queue.put(job, timeout=timeout)
        except queue.Full:
            return False
        with self._open_lock:
            self._open.setdefault(job, time.monotonic())
        return True

    def oldest_unanswered_s(self) -> float | None:
        """Age of the oldest job taken by the worker's queue and not answered yet (None: none waits)."""
        with self._open_lock:
            first = min(self._open.values(), default=None)
        return None if first is None else round(time.monotonic() - first, 1)

    def watch(self, name: str, thread: threading.Thread) -> None:
        """An intake thread whose death makes the agent unhealthy (and stops the systemd watchdog pings)."""
        self.intakes[name] = thread

    def dead_intakes(self) -> list[str]:
        return [name for name, t in self.intakes.items() if t.ident is not None and not t.is_alive()]

    def depth(self) -> int:
        return self.queue.qsize() + len(self._backlog)

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Finish what is queued (drain) and stop the thread."""
        if drain:
            deadline = time.monotonic() + timeout
            while (self.queue.qsize() or self._backlog) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=timeout)

    # ---------------------------------------------------------------- loop
    def _next(self, timeout: float) -> Job | None:
        if self._backlog:
            return self._backlog.popleft()
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        """More jobs of the same ROI and action, within max_wait_ms, up to max_batch."""
        batch = [first]
        if first.action not in ("predict", "fit_ok"):
            return batch
        deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
        while len(batch) < self.max_batch:
            job = self._next(max(0.0, deadline - time.perf_counter()))
            if job is None:
                break
            if (job.role_id, job.roi_id, job.action) != (first.role_id, first.roi_id, first.action):
                self._backlog.appendleft(job)  # the oldest job not yet run: next in line
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        self.rt.progress = self.heartbeat  # long model work (index rebuilds, big fits) keeps the watchdog fed
        while not self._stop.is_set():
            self.heartbeat()
            job = self._next(timeout=0.5)
            if job is None:
                self.rt.unload_idle()
                continue
            self._process_safely(self._gather(job))

    def _process_safely(self, batch: list[Job]) -> None:
        try:
            self._process(batch)
        except Exception as exc:  # never let one bad batch kill the worker
            job = batch[0]
            log.exception("worker: unexpected error on %s %s/%s", job.action, job.role_id, job.roi_id)
            for j in batch:
                if j not in self._finished:
                    self._finish(j, error_result(j, "internal_error", f"{type(exc).__name__}: {exc}"))

    def _serve_others(self, busy: tuple[str, str]) -> None:
        """Between steps of a long fit: answer the predictions of other ROIs that are waiting, so that one
        station's big fit_ok does not stall every other station. Per-ROI order is kept: a prediction
        waits if an earlier job of its ROI (or the ROI being fitted) is still waiting."""
        self.heartbeat()
        waiting = list(self._backlog)
        self._backlog.clear()
        # held jobs stay bounded (backpressure): at most one queue's worth taken out of the queue
        while len(waiting) < self.cfg.queue_size and (job := self._next(0)) is not None:
            waiting.append(job)
        held = {busy}
        for job in waiting:
            key = (job.role_id, job.roi_id)
            if job.action == "predict" and key not in held:
                self._process_safely([job])
            else:
                held.add(key)
                self._backlog.append(job)

    def _finish(self, job: Job, result: dict, preview: dict | None = None) -> None:
        self._finished.add(job)
        with self._open_lock:
            self._open.pop(job, None)
        self.counts[f"{job.action}_{result['status']}"] += 1
        for observe in self.observers:
            try:
                observe(job, result, preview)
            except Exception:
                log.exception("worker: observer failed for %s", job.request_id)
        if job.on_result is not None:
            try:
                job.on_result(job, result)
            except Exception:
                log.exception("worker: result delivery failed for %s", job.request_id)

    # ------------------------------------------------------------- actions
    def _decode(self, job: Job, data: bytes) -> tuple[object, float]:
        t0 = time.perf_counter()
        img = self.rt.decode(data, job.meta.get("mm_per_px"))
        return img, (time.perf_counter() - t0) * 1000

    def _process(self, batch: list[Job]) -> None:
        first = batch[0]
        if first.roi_id == os.environ.get("ANOMALY_DEBUG_STALL_ROI"):  # test hook: a hung worker (watchdog tests)
            mark = os.environ.get("ANOMALY_DEBUG_STALL_ONCE")  # a file: stall only if it does not exist yet
            if not mark or not os.path.exists(mark):
                if mark:
                    Path(mark).touch()
                log.warning("debug: ANOMALY_DEBUG_STALL_ROI=%s: the worker stalls now", first.roi_id)
                threading.Event().wait()
        try:
            creates = first.action in ("fit_ok", "send_ng") or (first.action == "calibrate" and first.images)
            try:
                model = self.rt.model(first.role_id, first.roi_id, create=bool(creates))
            except AnomalyError as exc:
                for j in batch:
                    self._finish(j, error_result(j, exc.code, exc.message))
                return
            self._act(model, batch)
        except AnomalyError as exc:  # e.g. disk_full refused before anything was written
            for j in batch:
                if j not in self._finished:
                    self._finish(j, error_result(j, exc.code, exc.message))
        except OSError as exc:  # the data root could not be written: a clear error, the model reloaded from disk
            code = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "storage_error"
            log.error("worker: %s on %s %s/%s: %s", code, first.action, first.role_id, first.roi_id, exc)
            self.rt.forget(first.role_id, first.roi_id)
            for j in batch:
                if j not in self._finished:
                    self._finish(j, error_result(j, code, f"could not write to the data root: {exc.strerror or exc}"))

    def _act(self, model: object, batch: list[Job]) -> None:
        first = batch[0]
        action = first.action
        if action == "predict":
            self._predict(model, batch)
        elif action == "fit_ok":
            self._fit(model, batch, "ok")
        elif action == "send_ng":
            self._fit(model, batch, "ng")
        elif action == "calibrate":
            for j in batch:
                try:
                    if j.images:
                        self._fit(model, [j], "ng")
                        continue
                    self._finish(j, ok_result(j, self._calibrate(model, j.meta)))
                    self._state_changed(model)
                except (AnomalyError, ValueError, TypeError) as exc:
                    code = getattr(exc, "code", "invalid_threshold")
                    self._finish(j, error_result(j, code, getattr(exc, "message", str(exc))))
        else:
            for j in batch:
                self._finish(j, error_result(j, "unknown_action", f"unknown action {action!r}"))

    @staticmethod
    def _calibrate(model: object, meta: dict) -> dict:
        """calibrate without images: `threshold` (manual), `reset` (back to the config) or `policy`."""
        def num(key: str) -> float | None:
            return None if meta.get(key) is None else float(meta[key])

        policy = requested_policy(meta.get("policy"), num("threshold"), as_bool(meta.get("reset", False)))
        return model.calibrate(policy, num("threshold"), num("ok_percentile"), num("ng_margin"),  # type: ignore
                               num("ng_recall"))

    def _predict(self, model: object, batch: list[Job]) -> None:
        ready: list[tuple[Job, object, float]] = []
        for j in batch:
            try:
                img, ms = self._decode(j, j.images[0])
                ready.append((j, img, ms))
            except AnomalyError as exc:
                self._finish(j, error_result(j, exc.code, exc.message))
        if not ready:
            return
        heat_default = self.rt.heatmap_default(batch[0].role_id, batch[0].roi_id)
        want_heatmap = any(as_bool(j.meta.get("heatmap", heat_default)) for j, _, _ in ready)
        try:
            results = model.predict([img for _, img, _ in ready], heatmap=want_heatmap,  # type: ignore[attr-defined]
                                    preview_px=self.preview_px)
        except AnomalyError as exc:
            for j, _, _ in ready:
                self._finish(j, error_result(j, exc.code, exc.message))
            return
        for (j, _, decode_ms), pred in zip(ready, results, strict=True):
            pred.add_decode(decode_ms)
            pred.queue_ms = (time.perf_counter() - j.enqueued_at) * 1000 - pred.inference_ms
            res = pred.to_dict()
            if pred.heatmap_png is not None and as_bool(j.meta.get("heatmap", heat_default)):
                res["heatmap_png_b64"] = base64.b64encode(pred.heatmap_png).decode()
            self.last_timing = {"inference_ms": pred.inference_ms, "batch_size": pred.batch_size,
                                "device": pred.device}
            log.info("predict %s/%s %s: score %.4f threshold %.4f anomaly=%s %.1f ms (batch %d, %s)",
                     j.role_id, j.roi_id, j.request_id, pred.score, pred.threshold, pred.is_anomaly,
                     pred.inference_ms, pred.batch_size, pred.device)
            self._finish(j, ok_result(j, res), pred.preview)

    def _fit(self, model: object, batch: list[Job], kind: str) -> None:
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
                self._finish(j, error_result(j, exc.code, exc.message))
                continue
            meta = {"source": j.meta.get("source", "unknown"), "request_id": j.request_id}
            for data, img in zip(j.images, decoded, strict=True):
                samples.append((data, img, meta))
                owners.append(j)
        if not samples:
            return
        if kind == "ok" and len(samples) > FIT_STEP:
            rep = self._fit_in_steps(model, samples, (batch[0].role_id, batch[0].roi_id))
        else:
            rep = model.fit_ok(samples) if kind == "ok" else model.send_ng(samples)  # type: ignore[attr-defined]
        state = {k: v for k, v in rep.items() if k not in ("added", "duplicates", "stored")}
        for j in dict.fromkeys(owners):  # each request counts its own images: stored now, or already stored
            mine = [new for o, new in zip(owners, rep["stored"], strict=True) if o is j]
            self._finish(j, ok_result(j, {"added": sum(mine), "duplicates": len(mine) - sum(mine),
                                          "duplicates_in_batch": len(rep["duplicates"]), **state}))
        self._state_changed(model)

    def _fit_in_steps(self, model: object, samples: list, key: tuple[str, str]) -> dict:
        """A large fit_ok in steps of FIT_STEP images, other ROIs' predictions served in between."""
        steps = (samples[start : start + FIT_STEP] for start in range(0, len(samples), FIT_STEP))
        return model.fit_ok_in_steps(steps, lambda: self._serve_others(key))  # type: ignore[attr-defined]

    def _state_changed(self, model: object) -> None:
        if self.on_state is not None:
            st = model.state()  # type: ignore[attr-defined]
            self.on_state(st["role_id"], st["roi_id"], st)
