"""OPC UA result events against MQTT results, in one run (issue 25):

    .venv/bin/python bench/opcua_latency.py > docs/results/opcua_latency.json

Starts a private Mosquitto and `anomaly-agent run` with MQTT and OPC UA (handshake off: every result is
current at once), a ROI fitted on 6 real tire images, an asyncua client subscribed to the ResultReady
events and an MQTT client subscribed to the result topic, both in this process (one clock). Then:
- serial: N predict requests by MQTT, one at a time; per request the time from publishing it to the
  MQTT result and to the OPC UA event (p50 / p95 ms), and the event's lag behind the MQTT result;
- burst: 200 requests published at once; every one must reach the OPC UA subscriber once, with
  ResultCounter 1..200 without a gap and in the order the MQTT results came.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from asyncua import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from datasets import shared_root  # noqa: E402
from throughput import pct  # noqa: E402 - the one p50/p95 helper of the daemon benchmarks

from tests.agent_proc import Agent, Observer  # noqa: E402
from tests.broker import Broker, free_port  # noqa: E402

ENV = {"ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0", "ANOMALY_AGENT_BACKBONE__RESOLUTION": "192",
       "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "1000"}


class Events:
    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.order: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def event_notification(self, event: object) -> None:
        now = time.monotonic()
        with self.lock:
            rid = str(event.ResultId)  # type: ignore[attr-defined]
            self.order.append((rid, int(event.ResultCounter)))  # type: ignore[attr-defined]
            self.at.setdefault(rid, now)


class MqttTimes(Observer):
    def __init__(self, port: int) -> None:
        self.at: dict[str, float] = {}
        self.order: list[str] = []
        super().__init__(port, topics=("anomaly/+/+/result",))

    def _on(self, c: object, u: object, m: object) -> None:
        now = time.monotonic()
        rid = json.loads(m.payload).get("request_id")  # type: ignore[attr-defined]
        with self.lock:
            self.at.setdefault(rid, now)
            self.order.append(rid)
        super()._on(c, u, m)


async def measure(port: int, mqtt: MqttTimes, images: list[bytes], serial: int, burst: int) -> dict:
    async with Client(f"opc.tcp://127.0.0.1:{port}/anomaly-agent") as client:
        idx = await client.get_namespace_index("urn:anomaly-agent:vision")
        etype = await client.nodes.root.get_child(["0:Types", "0:EventTypes", "0:BaseEventType",
                                                   f"{idx}:ResultReadyEventType"])
        events = Events()
        sub = await client.create_subscription(0, events)  # publishing interval 0: the server's fastest
        await sub.subscribe_events(client.nodes.server, etype)
        payloads = [json.dumps({"request_id": "", "image_b64": base64.b64encode(b).decode()}) for b in images]

        async def wait(rid: str, timeout: float = 300.0) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if rid in events.at and rid in mqtt.at:
                    return
                await asyncio.sleep(0.001)
            raise RuntimeError(f"no result for {rid}")

        sent: dict[str, float] = {}
        for i in range(serial + 3):  # 3 warm-up requests
            rid = f"s{i}"
            body = payloads[i % len(payloads)].replace('"request_id": ""', f'"request_id": "{rid}"', 1)
            sent[rid] = time.monotonic()
            mqtt.client.publish("anomaly/st1/tire/predict", body, qos=1)
            await wait(rid)
        ids = [f"s{i}" for i in range(3, serial + 3)]
        to_mqtt = [1000 * (mqtt.at[r] - sent[r]) for r in ids]
        to_event = [1000 * (events.at[r] - sent[r]) for r in ids]
        lag = [1000 * (events.at[r] - mqtt.at[r]) for r in ids]
        before = len(events.order)
        for i in range(burst):
            body = payloads[i % len(payloads)].replace('"request_id": ""', f'"request_id": "b{i}"', 1)
            mqtt.client.publish("anomaly/st1/tire/predict", body, qos=1)
        await wait(f"b{burst - 1}")
        await asyncio.sleep(1.0)
        got = events.order[before:]
        counters = [c for _, c in got]
        mqtt_order = [r for r in mqtt.order if r.startswith("b")]
        return {"serial": {"request_to_mqtt_result": pct(to_mqtt), "request_to_opcua_event": pct(to_event),
                           "event_after_mqtt_result": pct(lag)},
                "burst": {"sent": burst, "events": len(got), "distinct": len({r for r, _ in got}),
                          "counters_consecutive": counters == list(range(counters[0], counters[0] + len(got)))
                          if got else False,
                          "same_order_as_mqtt": [r for r, _ in got] == mqtt_order}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serial", type=int, default=40)
    ap.add_argument("--burst", type=int, default=200)
    args = ap.parse_args()
    tire = shared_root() / "datasets" / "mvtec_3d_ad" / "tire"
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:6]
    images = [p.read_bytes() for p in sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:8]]
    tmp = Path(tempfile.mkdtemp(prefix="opcua-bench-"))
    root = tmp / "data"
    env = {**os.environ, **ENV}
    subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(root), "--log-level", "WARNING", "fit",
                    "--role", "st1", "--roi", "tire", "--quiet", *map(str, train)], env=env, check=True, cwd=ROOT,
                   capture_output=True)
    broker = Broker(tmp / "broker")
    broker.start()
    port = free_port()
    agent = Agent(root, broker.port, env={**ENV, "ANOMALY_AGENT_OPCUA__ENABLED": "true",
                                          "ANOMALY_AGENT_OPCUA__PORT": str(port),
                                          "ANOMALY_AGENT_OPCUA__HANDSHAKE": "false"}).start()
    mqtt = MqttTimes(broker.port)
    try:
        out = asyncio.run(measure(port, mqtt, images, args.serial, args.burst))
    finally:
        mqtt.close()
        agent.sigterm()
        broker.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    print(json.dumps({"command": "bench/opcua_latency.py", "commit": commit.strip(), "machine": "2-core CPU",
                      **out}, indent=1))


if __name__ == "__main__":
    main()
