"""The one path of a request from any transport to the worker and back.

Each ingress (folder, MQTT, HTTP: a `Service` of agent/outputs.py) turns what it received into a `Job` with `build_job`
(ids, action, request id and parameters checked in one place), refuses what cannot become a job with
`refuse` (logged at WARNING with code, ROI and source, counted, answered), submits the job, and answers
its origin when the worker replies; `publish` then hands the result to every output (agent/outputs.py):
MQTT publishes folder and HTTP results on the result topic, the OPC UA server shows every result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from agent.jobs import ACTIONS, Job, Outcome, Params, error_result
from agent.outputs import Outputs
from agent.worker import Worker
from core.errors import InputError
from core.ids import request_id_from, safe_text, validate_id

log = logging.getLogger(__name__)


def params_from(raw: Mapping[str, object]) -> Params:
    """Request parameters from any ingress (form fields, JSON body, sidecar, v5 user properties): one schema
    (agent/jobs.py Params)."""
    return Params.of(raw)


class Intake:
    """Shared by the transports: build, refuse, submit, fan out."""

    def __init__(self, worker: Worker | None) -> None:
        self.worker = worker
        self.outputs = Outputs()  # filled by the daemon: every output (agent/outputs.py)
        self.refusal_observers: list[Callable[[str, str, str], None]] = []  # (ingress, action, code)

    def build_job(self, ingress: str, role_id: str, roi_id: str, action: str, images: list[bytes],
                  request_id: object, raw: Mapping[str, object], reply: Callable[[Job, Outcome], None] | None,
                  origin: object = None, actions: tuple[str, ...] = ACTIONS, default_id: str = "") -> Job:
        """A Job, or InputError (invalid_id, unknown_action, invalid_request_id, invalid_* parameters)."""
        self.check_target(role_id, roi_id, action, actions)
        rid = request_id_from(request_id) if request_id not in (None, "") else default_id
        return Job(role_id, roi_id, action, images, rid, params_from(raw), reply=reply, origin=origin,
                   ingress=ingress)

    @staticmethod
    def check_target(role_id: str, roi_id: str, action: str, actions: tuple[str, ...] = ACTIONS) -> None:
        """The ids and the action a request names (checked before its payload is parsed)."""
        validate_id(role_id, "role_id")
        validate_id(roi_id, "roi_id")
        if action not in actions:
            raise InputError(f"unknown action {safe_text(action, 60)!r}; use one of {', '.join(actions)}",
                             "unknown_action")

    @staticmethod
    def stub(ingress: str, role_id: str, roi_id: str, action: str, request_id: str, source: str = "unknown",
             reply: Callable[[Job, Outcome], None] | None = None, origin: object = None) -> Job:
        """A job that will only carry a refusal (its ids may be the invalid ones: they are only echoed)."""
        return Job(role_id, roi_id, action, [], request_id, Params(source=source), reply=reply, origin=origin,
                   ingress=ingress)

    def refuse(self, job: Job, code: str, message: str) -> dict:
        """An input answered with an error before it reached the queue: logged, counted; the error result."""
        log.warning("%s: refused %s %s/%s (request %s, source %s): %s: %s", job.ingress, safe_text(job.action, 60),
                    safe_text(job.role_id, 80), safe_text(job.roi_id, 80), job.request_id, job.params.source, code,
                    message)
        for observe in self.refusal_observers:
            try:
                observe(job.ingress, job.action if job.action in ACTIONS else "other", code)
            except Exception:
                log.exception("intake: refusal observer failed")
        return error_result(job, code, message)

    def submit(self, job: Job, timeout: float | None = None) -> bool:
        if self.worker is None:
            raise RuntimeError("intake without a worker")
        return self.worker.submit(job, timeout=timeout)

    def publish(self, origin: str, result: dict, key: str | None = None) -> None:
        """After the origin answered: the result to every output but the origin's own (agent/outputs.py)."""
        self.outputs.result(origin, result, key)
