"""How the worker takes jobs: predictions of one ROI micro-batched, a burst of fit_ok / send_ng of one ROI
taken as one change (agent/worker.py runs them)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.config import WorkerConfig
from agent.jobs import Job

log = logging.getLogger("agent.worker")
BURST_ACTIONS = ("fit_ok", "send_ng", "calibrate")  # a burst of these of one ROI is one change (calibrate: with images)


def gather(first: Job, next_job: Callable[[float], Job | None], backlog: deque[Job], cfg: WorkerConfig,
           max_batch: int) -> list[Job]:
    """More jobs of the same ROI and action: predictions within max_wait_ms, up to max_batch; fit_ok and
    send_ng everything of that ROI and action that is waiting (folder drops: or arrives within
    burst_settle_ms of the last one), up to burst_max images: one fit, one version."""
    batch = [first]
    if first.action in BURST_ACTIONS and (first.action != "calibrate" or first.images):
        return _burst(first, next_job, backlog, cfg)
    if first.action != "predict":
        return batch
    deadline = time.perf_counter() + cfg.max_wait_ms / 1000
    while len(batch) < max_batch:
        job = next_job(max(0.0, deadline - time.perf_counter()))
        if job is None:
            break
        if (job.role_id, job.roi_id, job.action) != (first.role_id, first.roi_id, first.action):
            backlog.appendleft(job)  # the oldest job not yet run: next in line
            break
        batch.append(job)
    return batch


def _burst(first: Job, next_job: Callable[[float], Job | None], backlog: deque[Job], cfg: WorkerConfig) -> list[Job]:
    """A burst: jobs of other ROIs met on the way wait in the backlog, in their order; a job of this ROI
    with another action ends the burst (per-ROI order is kept: a prediction between two drops sees the
    first)."""
    batch, images = [first], len(first.images)
    key = (first.role_id, first.roi_id)
    aside: list[Job] = []
    # drops trickle in as their files settle: wait for more; an API request is answered without waiting
    settle = cfg.burst_settle_ms / 1000 if first.ingress == "folder" else 0.0
    deadline = time.perf_counter() + settle
    while images < cfg.burst_max:
        job = next_job(max(0.0, deadline - time.perf_counter()))
        if job is None:
            break
        if (job.role_id, job.roi_id) != key:
            aside.append(job)
            if len(aside) >= cfg.queue_size:
                break
            continue
        if job.action != first.action or (job.action == "calibrate" and not job.images):
            aside.append(job)
            break
        batch.append(job)
        images += len(job.images)
        deadline = time.perf_counter() + settle  # settles after the last drop
    backlog.extendleft(reversed(aside))  # next in line, oldest first
    if len(batch) > 1:
        log.info("worker: %d %s requests to %s/%s (%d images) taken as one", len(batch), first.action, *key, images)
    return batch


class Between:
    """Long model work of one ROI (scoring its samples, a tuning, an index rebuild) calls `tick()` through the
    model's progress callback: the watchdog is fed, and every `every_s` the worker answers the predictions of
    other ROIs that wait (`serve(busy)`), never from inside such an answer. So one ROI's calibration or tuning
    holds another ROI's prediction for about one step of that work, not for all of it."""

    def __init__(self, heartbeat: Callable[[], None], serve: Callable[[tuple[str, str]], None],
                 every_s: float = 0.25) -> None:
        self.heartbeat, self.serve, self.every_s = heartbeat, serve, every_s
        self.busy: tuple[str, str] | None = None
        self._serving = False
        self._next = 0.0

    def tick(self) -> None:
        self.heartbeat()
        if self.busy is None or self._serving or time.monotonic() < self._next:
            return
        self._serving = True
        try:
            self.serve(self.busy)
        finally:
            self._serving = False
            self._next = time.monotonic() + self.every_s

    @contextmanager
    def working(self, key: tuple[str, str]) -> Iterator[None]:
        before, self.busy = self.busy, key
        try:
            yield
        finally:
            self.busy = before
