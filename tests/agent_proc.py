"""Helpers for end-to-end tests: the agent as a subprocess, an MQTT observer, waiting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "agent.yaml"


def wait_for(cond: Callable[[], object], timeout: float = 60, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


STARTED: list[Agent] = []


class Agent:
    """`anomaly-agent run` from the shipped config, pointed at a temp data root and the test broker."""

    def __init__(self, data_root: Path, port: int | None = None, env: dict[str, str] | None = None,
                 client_id: str = "agent-test", http_port: int | None = None) -> None:
        self.data_root = data_root
        self.env = {**os.environ, "ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0",
                    "ANOMALY_AGENT_BACKBONE__RESOLUTION": "192", "ANOMALY_AGENT_FOLDER__STABLE_S": "0.3",
                    "ANOMALY_AGENT_FOLDER__RESCAN_S": "1", "ANOMALY_AGENT_MQTT__CLIENT_ID": client_id,
                    "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "1000", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = [sys.executable, "-m", "agent.cli", "--config", str(SHIPPED), "--data-root", str(data_root),
                     "run"]
        if port is not None:
            self.env["ANOMALY_AGENT_MQTT__ENABLED"] = "true"
            self.args += ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(port)]
        if http_port is not None:
            self.env["ANOMALY_AGENT_HTTP__ENABLED"] = "true"
            self.args += ["--http-port", str(http_port)]
        self.http = f"http://127.0.0.1:{http_port}"
        self.proc: subprocess.Popen | None = None
        self.log = data_root.parent / f"{client_id}.log"

    def start(self, wait_ready: bool = True) -> Agent:
        self.data_root.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0  # a restart: only this run's lines count
        args = list(self.args)
        if self.env.get("ANOMALY_DEBUG_STALL_ROI"):  # the test-only entry point whose worker hangs on that ROI
            args[args.index("agent.cli")] = "tests.stall_agent"
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"), cwd=ROOT)
        STARTED.append(self)
        if wait_ready:
            wait_for(lambda: "anomaly-agent ready" in self.log.read_bytes()[offset:].decode(errors="replace")
                     or self._died(), 90, "agent ready")
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def sigterm(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        """After a test, pass or fail: no agent is left running."""
        if self.alive():
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(timeout=10)  # type: ignore[union-attr]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Observer:
    """A plain MQTT v5 client subscribed to the agent's topics, recording everything."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("anomaly/#",), persistent: bool = False,
                 ca: Path | None = None, auth: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool, object]] = []
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"obs-{time.monotonic_ns()}")
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_message = self._on
        self.client.on_connect = lambda c, *_: [c.subscribe(t, qos=1) for t in topics]
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        props = None
        if persistent:  # the broker keeps our messages while we (or it) are away
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        time.sleep(0.3)

    def _on(self, _c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((m.topic, m.payload, m.retain, m.properties))
            self.cond.notify_all()

    def wait_result(self, request_id: str, timeout: float = 60) -> dict:
        """Block until a result with this request_id arrives (no polling delay)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, p, _, _ in reversed(self.messages):
                    if t.endswith("/result") and json.loads(p).get("request_id") == request_id:
                        return json.loads(p)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no result for {request_id} within {timeout}s")
                self.cond.wait(left)

    def publish(self, topic: str, payload: bytes | str, props: object = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def results(self, topic_suffix: str = "/result") -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _, _ in self.messages if t.endswith(topic_suffix)]

    def copies_by(self, key: Callable[[dict], str | None]) -> dict[str, list[str]]:
        """Result payloads as canonical JSON, grouped by key(result) (None: left out). A QoS 1 redelivery
        is an identical copy in its group; a second, different result is a second distinct string."""
        out: dict[str, list[str]] = {}
        for r in self.results():
            k = key(r)
            if k is not None:
                out.setdefault(k, []).append(json.dumps(r, sort_keys=True))
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def folder_completions(data_root: Path, roi: str | None = None) -> Counter:
    """How many times each folder file was processed (results/completions.log, append-only): the evidence
    for "exactly once" on the folder side, where a second processing would overwrite the result file."""
    log = data_root / "results" / "completions.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(e["file"] for e in map(json.loads, lines) if roi is None or e["roi_id"] == roi)
