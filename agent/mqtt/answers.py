"""How MQTT requests are answered: results through the durable outbox (once journaled), refusals of messages
that were never recorded, replays of a repeated request, and the direct answer when the disk is full."""

from __future__ import annotations

import base64
import json
import logging
import threading

from agent.intake import Intake
from agent.jobs import Job, Outcome
from agent.mqtt.durable import Replies, Spool
from agent.mqtt.outbox import OutboxPublisher
from agent.mqtt.requests import replay_messages, why_duplicate
from core.ids import safe_text

log = logging.getLogger(__name__)


class Answers:
    def __init__(self, base: str, agent_id: str, intake: Intake, spool: Spool, replies: Replies,
                 outbox: OutboxPublisher, wake: threading.Event, replay_results: int) -> None:
        self.base = base
        self.agent_id = agent_id
        self.intake = intake
        self.spool = spool
        self.replies = replies
        self.outbox = outbox
        self._wake = wake
        self._replay_results = replay_results
        self.recording: dict[str, threading.Event] = {}  # predict requests being journaled, by key

    def deliver(self, job: Job, outcome: Outcome) -> None:
        """The answer of a job (the worker's reply callback): into the outbox, then published."""
        meta: dict = job.origin if isinstance(job.origin, dict) else {}
        recorded = self.recording.pop(meta["key"], None) if job.action == "predict" and "key" in meta else None
        if recorded is not None:
            recorded.wait()  # never an answer for a request whose journal entry is not on disk
            if meta.get("unrecorded"):
                log.warning("mqtt: prediction of %s dropped: it was answered disk_full", safe_text(meta["key"]))
                return
        msgs = [self.result_message(outcome.with_heatmap_b64())]
        if meta.get("response_topic"):
            msgs.append({**msgs[0], "topic": meta["response_topic"], "correlation_b64": meta.get("correlation_b64")})
        self.spool.answer(meta.get("key"), meta.get("seq"), msgs, written=self._wake.set)
        self.intake.publish("mqtt", outcome.result, meta.get("key"))  # to every other output (OPC UA, ...)
        if meta.get("replayable") and meta.get("key") and meta.get("payload_sha256"):
            try:
                self.replies.put(meta["key"], meta["payload_sha256"], msgs[:1])
            except OSError as exc:  # best effort: the answer itself is in the outbox
                log.warning("mqtt: answer of %s not kept for replays: %s", meta["key"], exc)
        self._wake.set()

    def result_message(self, result: dict) -> dict:
        """A result (any ingress) as an outbox message for <base>/<role_id>/<roi_id>/result."""
        payload = json.dumps({**result, "agent_id": self.agent_id})
        return {"topic": f"{self.base}/{result['role_id']}/{result['roi_id']}/result", "payload": payload, "qos": 1}

    def _split(self, topic: str) -> tuple[str, str, str]:
        role, roi, action = topic[len(self.base) + 1 :].split("/")
        return role, roi, action

    def answer_now(self, topic: str, request_id: str, user: dict, response_topic: object, correlation: bytes | None,
                   code: str, message: str) -> None:
        """Answer a message refused before it was recorded (to its response topic too), without the queue."""
        role, roi, action = self._split(topic)
        origin = {"topic": topic, "user": user, "response_topic": response_topic, "request_id": request_id,
                  "correlation_b64": base64.b64encode(correlation).decode() if correlation else None}
        job = self.intake.stub("mqtt", role, roi, action, request_id, "mqtt", self.deliver, origin)
        self.deliver(job, Outcome(self.intake.refuse(job, code, message)))

    def repeated(self, topic: str, key: str, request_id: str, payload_sha: str, user: dict, response_topic: object,
                 correlation: bytes | None) -> None:
        """A request id seen before for this ROI and action: the same payload gets its stored answer again
        (`replay: true`), a different one (or an answer no longer kept) `duplicate_request`."""
        role, roi, action = self._split(topic)
        stored = self.replies.get(key)
        if stored is not None and stored.get("payload_sha256") == payload_sha and stored.get("messages"):
            msgs = replay_messages(stored["messages"][0], response_topic, correlation)
            log.warning("mqtt: request_id %s repeated for %s/%s/%s with the same payload: its result sent again",
                        request_id, safe_text(role), safe_text(roi), safe_text(action))
            self.spool.enqueue(msgs)
            self._wake.set()
            return
        why = why_duplicate(stored is not None, self.spool.in_flight(key), self._replay_results)
        log.warning("mqtt: request_id %s reused for %s/%s/%s: answered duplicate_request", request_id,
                    safe_text(role), safe_text(roi), safe_text(action))
        self.answer_now(topic, request_id, user, response_topic, correlation, "duplicate_request",
                        f"request_id {request_id!r} was already taken for {role}/{roi}/{action}: {why}; use a new "
                        "request_id for a new request")

    def publish_now(self, topic: str, request_id: str, response_topic: object, correlation: bytes | None,
                    code: str, message: str) -> None:
        """An error answer that cannot go through the outbox (the disk is full): published directly."""
        role, roi, action = self._split(topic)
        job = self.intake.stub("mqtt", role, roi, action, request_id, "mqtt")
        self.outbox.publish_now(self.result_message(self.intake.refuse(job, code, message)), response_topic,
                                correlation)


