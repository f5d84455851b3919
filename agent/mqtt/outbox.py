"""The MQTT outbox publisher: sends the disk outbox in order; a file leaves only after its PUBACKs."""

from __future__ import annotations

import base64
import logging
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.durable import Spool, read_outbox
from agent.process.backoff import Backoff

log = logging.getLogger(__name__)


class OutboxPublisher:
    def __init__(self, client: mqtt.Client, spool: Spool, connected: threading.Event, wake: threading.Event,
                 v5: bool) -> None:
        self.client = client
        self.spool = spool
        self._connected = connected
        self._wake = wake
        self.v5 = v5

    def run(self) -> None:
        """Send the outbox in order; a file is deleted only after the broker's PUBACK of all its messages.

        paho keeps an unacknowledged message and resends it after a reconnect, so a message that
        timed out is waited on again (not published twice) on the next round.
        """
        inflight: dict[str, mqtt.MQTTMessageInfo] = {}
        backoff = Backoff("mqtt-out")
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._round(inflight)
                backoff.ok()
            except OSError as exc:  # out of descriptors, a disk error: the file stays, tried again later
                time.sleep(backoff.failed(exc))

    def _round(self, inflight: dict[str, mqtt.MQTTMessageInfo]) -> None:
        for path in self.spool.outgoing():
            if not self._connected.is_set():
                break
            try:
                key, messages = read_outbox(path)
            except FileNotFoundError:
                continue
            except (ValueError, UnicodeDecodeError):  # its content, not the machine: never readable again
                log.error("mqtt: outbox file %s is not valid JSON: dropped", path.name)
                path.unlink(missing_ok=True)
                continue
            if not all(self._publish(f"{path.name}#{i}", msg, inflight) for i, msg in enumerate(messages)):
                break  # no PUBACK yet (broker gone?): keep the file, wait again after reconnect
            self.spool.wait_logged(key)  # published before answered.log had the key: not removed before
            path.unlink(missing_ok=True)
            for i in range(len(messages)):
                inflight.pop(f"{path.name}#{i}", None)

    def _publish(self, name: str, msg: dict, inflight: dict[str, mqtt.MQTTMessageInfo]) -> bool:
        """Publish one outbox message (once per process: kept in `inflight` until its file is gone) and
        wait for its PUBACK."""
        info = inflight.get(name)
        if info is None:
            props = json_properties(self.v5)  # every outbox message is JSON (results, health)
            if msg.get("correlation_b64") and props is not None:
                props.CorrelationData = base64.b64decode(msg["correlation_b64"])
            info = self.client.publish(msg["topic"], msg["payload"], qos=msg.get("qos", 1), retain=False,
                                       properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            inflight[name] = info
        try:
            info.wait_for_publish(timeout=15)
        except (RuntimeError, ValueError):
            pass
        return info.is_published()

    def publish_now(self, first: dict, response_topic: object, correlation: bytes | None) -> None:
        """An answer that cannot go through the outbox (the disk is full): published directly, QoS 1."""
        self.client.publish(first["topic"], first["payload"], qos=1, properties=json_properties(self.v5))
        if response_topic:
            props = json_properties(True)
            if correlation:
                props.CorrelationData = correlation
            self.client.publish(str(response_topic), first["payload"], qos=1, properties=props)

    def flush(self, deadline: float) -> None:
        """At shutdown: wait (until `deadline`, monotonic) for the outbox to empty while connected."""
        self._wake.set()
        while self.spool.outgoing() and self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)


def json_properties(v5: bool) -> Properties | None:
    """MQTT v5 properties of a JSON message: content type application/json, payload format UTF-8 (so a
    subscriber such as Node-RED parses it without a guess); None on MQTT 3.1.1, which has no properties."""
    if not v5:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    return props
