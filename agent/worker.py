"""The inference worker: one thread owns the models and the device; ingestion only enqueues.

Predicts for the same ROI that arrive within `max_wait_ms` are micro-batched (up to `max_batch`); a burst
of fit_ok / send_ng jobs of one ROI (waiting, or arriving within `burst_settle_ms` of each other) is fitted
together: one version, at most one tuning (agent/actions.py does the work). Every job ends
in exactly one call of its `reply` with an `Outcome` (ok or error result, heatmap bytes, preview);
observers (metrics, the operator page's recent results, debug heatmap files) see each outcome first.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable

from agent.actions import Actions, ActionSettings
from agent.config import WorkerConfig
from agent.jobs import Job, Outcome, error_result
from agent.process.batches import Between, gather
from agent.runtime import Runtime
from core.errors import AnomalyError

log = logging.getLogger(__name__)


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
        self.settings = ActionSettings()
        self._state_listeners: list[Callable[[str, str, dict], None]] = []
        if on_state is not None:
            self.add_state_listener(on_state)
        self.actions: Actions
        self.observers: list[Callable[[Job, Outcome], None]] = []
        self._finished: weakref.WeakSet[Job] = weakref.WeakSet()  # jobs already answered (exactly once)
        self.counts: Counter[str] = Counter()
        self._fair = FairShare(max(1, int(cfg.queue_size * cfg.ingress_share)))
        self._stop = threading.Event()
        self._backlog: deque[Job] = deque()  # taken from the queue, not yet run: served before the queue
        self._between = Between(lambda: self.heartbeat(), self._serve_others)
        self._slots = threading.BoundedSemaphore(cfg.queue_size)  # queue + set aside <= queue_size
        self._thread = threading.Thread(target=self._main, name="worker", daemon=True)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.max_batch = 1
        self._open: dict[Job, float] = {}  # submitted, not yet answered -> when submitted (monotonic)
        self._open_lock = threading.Lock()
        self.intakes: dict[str, threading.Thread] = {}  # intake threads, watched by /health and the watchdog

    # the actions' settings, set by the transports (operator page thumbnails, MQTT state, debug heatmaps)
    @property
    def on_state(self) -> Callable[[str, str, dict], None] | None:
        return self.settings.on_state

    @on_state.setter
    def on_state(self, fn: Callable[[str, str, dict], None] | None) -> None:
        """Adds a state listener (MQTT's state topic, the OPC UA server): each one is told every change."""
        if fn is not None:
            self.add_state_listener(fn)

    def add_state_listener(self, fn: Callable[[str, str, dict], None]) -> None:
        self._state_listeners.append(fn)
        self.settings.on_state = self._tell_state

    def _tell_state(self, role_id: str, roi_id: str, state: dict) -> None:
        for listen in self._state_listeners:
            try:
                listen(role_id, roi_id, state)
            except Exception:
                log.exception("worker: a state listener failed for %s/%s", role_id, roi_id)

    @property
    def preview_px(self) -> int:
        return self.settings.preview_px

    @preview_px.setter
    def preview_px(self, px: int) -> None:
        self.settings.preview_px = px

    @property
    def last_timing(self) -> dict:
        return self.settings.last_timing

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
            self.actions = Actions(self.rt, self.settings, self._finish, self.heartbeat, self._serve_others)
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
        """Enqueue (blocking while the queue is full: backpressure). False on timeout. One ingress holds at
        most `worker.ingress_share` of the queue: a flood on one (an open broker) leaves room for the others."""
        job.enqueued_at = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._fair.enter(job.ingress, deadline):
            return False
        # a slot is held until the job is taken to run: jobs set aside (a burst, another ROI's work) still count
        if not self._slots.acquire(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
            self._fair.leave(job.ingress)
            return False
        self.queue.put(job)
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
            job = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        self._fair.leave(job.ingress)
        return job

    def _gather(self, first: Job) -> list[Job]:
        return gather(first, self._next, self._backlog, self.cfg, self.max_batch)

    def _run(self) -> None:
        self.rt.progress = self._between.tick  # long model work feeds the watchdog and serves other ROIs
        while not self._stop.is_set():
            self.heartbeat()
            job = self._next(timeout=0.5)
            if job is None:
                self.rt.unload_idle()
                continue
            self._process_safely(self._gather(job))

    def _process_safely(self, batch: list[Job]) -> None:
        for _ in batch:
            self._slots.release()
        try:
            self._process(batch)
        except Exception as exc:  # never let one bad batch kill the worker
            job = batch[0]
            log.exception("worker: unexpected error on %s %s/%s", job.action, job.role_id, job.roi_id)
            for j in batch:
                if j not in self._finished:
                    self._finish(j, Outcome(error_result(j, "internal_error", f"{type(exc).__name__}: {exc}")))

    def _tell_unloadable(self, role_id: str, roi_id: str) -> None:
        """A ROI that cannot be loaded is said on the state topic too (its state: the reason, what next)."""
        info = self.rt.unloadable.get((role_id, roi_id))
        if info is None or self.settings.on_state is None:
            return
        try:
            self.settings.on_state(role_id, roi_id, {"role_id": role_id, "roi_id": roi_id, "unloadable": info})
        except Exception:
            log.exception("worker: the state of unloadable ROI %s/%s could not be published", role_id, roi_id)

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

    def _finish(self, job: Job, outcome: Outcome) -> None:
        self._finished.add(job)
        with self._open_lock:
            self._open.pop(job, None)
        self.counts[f"{job.action}_{outcome.result['status']}"] += 1
        if outcome.result["status"] != "ok":  # every refusal reaches journalctl at WARNING, whatever the ingress
            err = outcome.result["error"]
            log.warning("%s: refused %s %s/%s (request %s, source %s): %s: %s", job.ingress, job.action, job.role_id,
                        job.roi_id, job.request_id, job.params.source, err["code"], err["message"])
        for observe in self.observers:
            try:
                observe(job, outcome)
            except Exception:
                log.exception("worker: observer failed for %s", job.request_id)
        if job.reply is not None:
            try:
                job.reply(job, outcome)
            except Exception:
                log.exception("worker: result delivery failed for %s", job.request_id)

    def _process(self, batch: list[Job]) -> None:
        first = batch[0]
        try:
            creates = first.action in ("fit_ok", "send_ng") or (first.action == "calibrate" and first.images)
            try:
                model = self.rt.model(first.role_id, first.roi_id, create=bool(creates))
            except AnomalyError as exc:
                for j in batch:
                    self.actions.fail(j, exc.code, exc.message)
                if exc.code == "roi_unloadable":
                    self._tell_unloadable(first.role_id, first.roi_id)
                return
            with self._between.working((first.role_id, first.roi_id)):
                self.actions.run(model, batch)
        except AnomalyError as exc:  # e.g. disk_full refused before anything was written
            for j in batch:
                if j not in self._finished:
                    self.actions.fail(j, exc.code, exc.message)
        except OSError as exc:  # the data root could not be written: a clear error, the model reloaded from disk
            code = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "storage_error"
            log.error("worker: %s on %s %s/%s: %s", code, first.action, first.role_id, first.roi_id, exc)
            self.rt.forget(first.role_id, first.roi_id)
            for j in batch:
                if j not in self._finished:
                    self.actions.fail(j, code, f"could not write to the data root: {exc.strerror or exc}")


class FairShare:
    """Jobs in the queue per ingress, at most `share` each (config worker.ingress_share)."""

    def __init__(self, share: int) -> None:
        self.share = share
        self._by: Counter[str] = Counter()
        self._cond = threading.Condition()

    def enter(self, ingress: str, deadline: float | None) -> bool:
        """Wait (until `deadline`, monotonic; None: forever) for a place of this ingress; False: none."""
        with self._cond:
            while self._by[ingress] >= self.share:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            self._by[ingress] += 1
            return True

    def leave(self, ingress: str) -> None:
        """A job of this ingress left the queue."""
        with self._cond:
            self._by[ingress] -= 1
            self._cond.notify_all()
