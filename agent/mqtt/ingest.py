"""MQTT ingestion and publishing (paho-mqtt 2.x; MQTT v5, or 3.1.1 as an option).

Requests:  <base>/<role_id>/<roi_id>/{predict,fit_ok,send_ng,calibrate}
Results:   <base>/<role_id>/<roi_id>/result (QoS 1, not retained), and the v5 response topic if any
State:     <base>/<role_id>/<roi_id>/state (retained)
Status:    <base>/status  online / offline (retained; offline is also the Last Will)
Health:    <base>/health_check -> <base>/health

A request is acknowledged only after it is recorded on disk (manual ack), and only when the worker
queue has room (backpressure); results go to a disk outbox and leave it after the broker's PUBACK.
See docs/protocol.md.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import queue
import ssl
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig, MqttConfig
from agent.health import health_body
from agent.intake import Intake
from agent.jobs import Job, Outcome
from agent.mqtt.answers import Answers
from agent.mqtt.durable import Replies, Spool
from agent.mqtt.outbox import OutboxPublisher, json_properties
from agent.mqtt.requests import parse_request, peek_request_id
from agent.runtime import Runtime
from agent.worker import Worker
from core.errors import InputError
from core.ids import request_id_from, safe_text, short_request_id
from core.roi.manifest import unusable_rois
from core.roi.model import stored_rois

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = ("result", "state")
PACKET_OVERHEAD = 64 * 1024  # topic, properties, headers on top of mqtt.max_payload_bytes


def make_client(mc: MqttConfig) -> mqtt.Client:
    """The paho client as the config says: protocol, manual acks, credentials, TLS, Last Will."""
    kw = {"client_id": mc.client_id, "manual_ack": True}
    if mc.protocol == "5":
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, **kw)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, clean_session=False, **kw)
    if mc.username:
        password = mc.password_file.read_text().strip() if mc.password_file else None
        client.username_pw_set(mc.username, password)
    if mc.tls:
        t = mc.tls
        client.tls_set(ca_certs=str(t.ca) if t.ca else None, certfile=str(t.cert) if t.cert else None,
                       keyfile=str(t.key) if t.key else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.will_set(f"{mc.base_topic}/status", "offline", qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=15)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client


class MqttIngest:
    name = "mqtt"

    def __init__(self, cfg: AgentConfig, intake: Intake, rt: Runtime, started: float) -> None:
        self.cfg = cfg
        self.mc = cfg.mqtt
        self.intake = intake
        if intake.worker is None:
            raise RuntimeError("the MQTT transport needs the worker")
        self.worker: Worker = intake.worker
        self.rt = rt
        self.started = started
        self.base = self.mc.base_topic
        self.spool = Spool(cfg.data_root / "mqtt" / self.mc.client_id)
        self.replies = Replies(cfg.data_root / "mqtt" / self.mc.client_id / "replies", self.mc.replay_results)
        self.v5 = self.mc.protocol == "5"
        self._connected = threading.Event()
        self._stop = threading.Event()
        # (job, (mid, qos) to acknowledge, set once its journal entry is written) from the network thread
        self._feed: queue.Queue[tuple[Job, tuple[int, int] | None, threading.Event | None] | None] = queue.Queue()
        self._wake = threading.Event()
        self.client = make_client(self.mc)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.outbox = OutboxPublisher(self.client, self.spool, self._connected, self._wake, self.v5)
        self.answers = Answers(self.base, self.mc.client_id, intake, self.spool, self.replies, self.outbox, self._wake,
                               self.mc.replay_results)
        self._threads = [threading.Thread(target=self._feeder, name="mqtt-feed", daemon=True),
                         threading.Thread(target=self.outbox.run, name="mqtt-out", daemon=True)]

    # ------------------------------------------------------------- client
    def start(self) -> None:
        for meta, payload in self.spool.pending():  # requests recorded before a crash come first
            log.info("mqtt: resuming recorded request %s", meta["key"])
            self._dispatch(meta, payload, mid=None)
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.mc.session_expiry_s
            props.ReceiveMaximum = max(1, min(65535, self.cfg.worker.queue_size))
            # the broker does not send a larger message at all: a huge payload never reaches our memory;
            # up to twice the limit it does, and the sender gets payload_too_large
            props.MaximumPacketSize = min(2 * self.mc.max_payload_bytes + PACKET_OVERHEAD, 268_435_455)
        kwargs = {"clean_start": False, "properties": props} if self.v5 else {}
        self.client.connect_async(self.mc.host, self.mc.port, self.mc.keepalive, **kwargs)
        self.client.loop_start()
        for t in self._threads:
            t.start()
            self.worker.watch(t.name, t)
        loop = getattr(self.client, "_thread", None)  # paho's network loop thread
        if isinstance(loop, threading.Thread):
            self.worker.watch("mqtt-network", loop)

    def stop(self) -> None:
        """Stop intake: no more requests are taken from the broker (unacked ones are redelivered)."""
        self._stop.set()
        self._feed.put(None)

    def close(self, timeout: float = 10.0) -> None:
        """After the worker drained: flush the outbox, publish offline, disconnect."""
        deadline = time.monotonic() + timeout
        self.outbox.flush(deadline)
        if self._connected.is_set():
            info = self.client.publish(f"{self.base}/status", "offline", qos=1, retain=True)
            info.wait_for_publish(timeout=max(0.5, deadline - time.monotonic()))
        self.client.disconnect()
        self.client.loop_stop()

    # ---------------------------------------------------------- callbacks
    def _topic_filter(self) -> str:
        t = f"{self.base}/+/+/+"
        return f"$share/{self.mc.shared_group}/{t}" if self.mc.shared_group else t

    def _on_connect(self, client: mqtt.Client, _ud: object, _flags: object, reason: object, _props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("mqtt: connection refused: %s", reason)
            return
        log.info("mqtt: connected to %s:%d (session present: %s)", self.mc.host, self.mc.port,
                 getattr(_flags, "session_present", None))
        if self.v5:
            opts = mqtt.SubscribeOptions(qos=self.mc.qos, noLocal=not self.mc.shared_group)
            client.subscribe([(self._topic_filter(), opts), (f"{self.base}/health_check", mqtt.SubscribeOptions(
                qos=self.mc.qos, noLocal=True))])
        else:
            client.subscribe([(self._topic_filter(), self.mc.qos), (f"{self.base}/health_check", self.mc.qos)])
        client.publish(f"{self.base}/status", "online", qos=1, retain=True)
        for _, state in stored_rois(self.cfg.data_root):  # read-only: the worker owns the models
            self.on_state(state["role_id"], state["roi_id"], state)
        for state in unusable_rois(self.cfg.data_root):  # a ROI whose files cannot be used: said, with the reason
            self.on_state(state["role_id"], state["roi_id"], state)
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, _c: object, _ud: object, _flags: object, reason: object, _p: object) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("mqtt: disconnected (%s); reconnecting, results wait in the outbox", reason)

    def _on_message(self, client: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle_message(msg)
        except Exception:
            log.exception("mqtt: could not record a message on %s; it will be redelivered", msg.topic)

    def _handle_message(self, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic == f"{self.base}/health_check":
            self._health()
            self.client.ack(msg.mid, msg.qos)
            return
        parts = topic[len(self.base) + 1 :].split("/")
        if len(parts) != 3 or parts[2] in OUTPUT_SUFFIXES:
            self.client.ack(msg.mid, msg.qos)
            return
        props = msg.properties
        user = dict(getattr(props, "UserProperty", []) or []) if props else {}
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        raw_id, body = peek_request_id(msg.payload, user)
        try:
            request_id = request_id_from(raw_id) if raw_id is not None else None
        except InputError as exc:  # answered now, under a marked short id: never cut in silence
            self.answers.answer_now(topic, short_request_id(raw_id), user, response_topic, correlation, exc.code,
                                    exc.message)
            self.client.ack(msg.mid, msg.qos)
            return
        # a request id is scoped by its ROI and action: two stations numbering from 1 never collide
        scoped = f"{parts[0]}/{parts[1]}/{parts[2]}/{request_id}" if request_id else None
        payload_sha = hashlib.sha256(msg.payload).hexdigest()
        key = scoped or ("sha:" + hashlib.sha256(topic.encode() + b"\0" + msg.payload).hexdigest())
        if self.spool.known(key) and (request_id or msg.dup):
            if request_id and not msg.dup:  # a new message reusing an id: answered, never dropped in silence
                self.answers.repeated(topic, key, request_id, payload_sha, user, response_topic, correlation)
            else:
                log.info("mqtt: redelivery of %s dropped (already recorded or answered)", key)
            self.client.ack(msg.mid, msg.qos)
            return
        if not request_id:
            key = f"gen:{uuid.uuid4().hex}"
        meta = {"topic": topic, "user": user, "response_topic": response_topic,
                "correlation_b64": base64.b64encode(correlation).decode() if correlation else None,
                "request_id": request_id or key, "received": time.time(), "payload_sha256": payload_sha,
                "replayable": bool(request_id)}
        if parts[2] == "predict":  # journaled while the worker predicts (read-only: nothing to undo)
            self._predict_early(key, meta, msg, correlation, body)
        elif self._record(key, meta, msg.payload, correlation):
            self._dispatch(meta, msg.payload, msg.mid, msg.qos, body)
        else:
            self.client.ack(msg.mid, msg.qos)

    def _predict_early(self, key: str, meta: dict, msg: mqtt.MQTTMessage, correlation: bytes | None,
                       body: dict | None) -> None:
        """A predict goes to the worker before its journal entry is written (3 ms of fsyncs off the round
        trip), with the same guarantees: the PUBACK waits for the entry (the feeder), and so does the result
        (`Answers.deliver`), so nothing is answered or acknowledged that a crash could lose or answer twice. If the
        entry cannot be written (a full disk), the request is answered `disk_full` now and the prediction
        dropped, as before."""
        meta["key"] = key  # a refusal is answered under it (a redelivery of the message is dropped)
        job = self._job(meta, msg.payload, (msg.mid, msg.qos), body)
        if job is None:  # refused (and answered under its key) before anything was recorded
            return
        done = self.answers.recording[key] = threading.Event()
        self._feed.put((job, (msg.mid, msg.qos), done))
        try:
            meta["unrecorded"] = not self._record(key, meta, msg.payload, correlation)
        finally:
            done.set()

    def _record(self, key: str, meta: dict, payload: bytes, correlation: bytes | None) -> bool:
        """Journal a request before its PUBACK. On a full disk it is answered now (not kept), so the
        sender can send it again: False."""
        try:
            meta.update(key=key, seq=self.spool.record(key, meta, payload))
            return True
        except OSError as exc:
            code = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "storage_error"
            log.error("mqtt: %s: could not record %s (%s); answered %s", safe_text(meta["topic"]), safe_text(key),
                      exc.strerror or exc, code)
            self.answers.publish_now(meta["topic"], meta["request_id"], meta["response_topic"], correlation, code,
                                     f"the agent could not record the request: {exc.strerror or exc}; nothing was "
                                     "done, send it again")
            return False

    # ------------------------------------------------------------ requests
    def _dispatch(self, meta: dict, payload: bytes, mid: int | None, qos: int = 1, body: dict | None = None) -> None:
        job = self._job(meta, payload, None if mid is None else (mid, qos), body)
        if job is not None:
            self._feed.put((job, None if mid is None else (mid, qos), None))

    def _job(self, meta: dict, payload: bytes, ack: tuple[int, int] | None, body: dict | None) -> Job | None:
        """The job of a request, or None when it was refused (answered and acknowledged here)."""
        role, roi, action = meta["topic"][len(self.base) + 1 :].split("/")
        stub = self.intake.stub("mqtt", role, roi, action, meta["request_id"], "mqtt", self.answers.deliver, meta)
        try:
            self.intake.check_target(role, roi, action)
            images, raw = parse_request(action, payload, meta.get("user") or {}, self.mc.max_payload_bytes, body)
            return self.intake.build_job("mqtt", role, roi, action, images, meta["request_id"],
                                         {"source": "mqtt", **raw}, self.answers.deliver, meta)
        except InputError as exc:
            self.answers.deliver(stub, Outcome(self.intake.refuse(stub, exc.code, exc.message)))
            if ack is not None:
                self.client.ack(*ack)
            return None

    def _feeder(self) -> None:
        """Hand requests to the worker; ack each one only when the worker took it and its journal entry is
        written (a predict's entry may still be in writing when it is handed over)."""
        while True:
            item = self._feed.get()
            if item is None:
                return
            job, ack, recorded = item
            while not self.intake.submit(job, timeout=0.5):
                if self._stop.is_set() and ack is not None:
                    return  # not acked: the broker redelivers; the journal has it (or the request is new)
            if recorded is not None:
                recorded.wait()  # journaled (or answered disk_full) before the PUBACK
            if ack is not None:
                self.client.ack(*ack)

    # ------------------------------------------------------------- output
    def on_result(self, origin: str, result: dict, key: str | None = None) -> None:
        """A result sink: publish a result that came in through another ingress (folder, HTTP); once per `key`."""
        msgs = [self.answers.result_message(result)]
        if key is None:
            self.spool.enqueue(msgs)
        elif not self.spool.answer_once(key, msgs):
            log.info("mqtt: %s was already published; not again", key)
            return
        self._wake.set()

    def on_state(self, role: str, roi: str, state: dict) -> None:
        self.client.publish(f"{self.base}/{role}/{roi}/state", json.dumps(state), qos=1, retain=True,
                            properties=json_properties(self.v5))

    def _health(self) -> None:
        body = {**health_body(self.rt, self.worker, self.started, self.mc.client_id),
                "outbox": len(self.spool.outgoing())}
        self.spool.enqueue([{"topic": f"{self.base}/health", "payload": json.dumps(body), "qos": 1}])
        self._wake.set()
