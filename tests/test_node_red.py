"""examples/node-red/flow.json in a real Node-RED against a real Mosquitto and agent: it sends predict
requests for the image paths it is given and routes each result to OK, NG or error.

Node-RED is a Node.js application, not a Python dependency: this test runs where it is installed
(`ANOMALY_NODE_RED` = its executable, or `node-red` on the PATH; .ci/run tries `npm install node-red`)
and is skipped elsewhere, saying so; under CI=true (.ci/run installs it) its absence fails the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker, free_port
from tests.require import missing

FLOW = Path(__file__).resolve().parents[1] / "examples" / "node-red" / "flow.json"


def node_red() -> str:
    exe = os.environ.get("ANOMALY_NODE_RED") or shutil.which("node-red")
    local = Path(__file__).resolve().parents[2] / "node-red" / "node_modules" / ".bin" / "node-red"
    if not exe and local.exists():  # where .ci/run installs it (beside the checkout)
        exe = str(local)
    if not exe:
        missing("Node-RED is not installed (npm install node-red; set ANOMALY_NODE_RED to its executable)")
    return exe


def test_the_node_red_example_routes_ok_ng_and_error(data_root: Path, tire: Path, broker: Broker,
                                                    tmp_path: Path) -> None:
    exe = node_red()
    flow = json.loads(FLOW.read_text())
    for node in flow:
        if node["type"] == "mqtt-broker":
            node["port"] = str(broker.port)
            node["broker"] = "127.0.0.1"
    flow_file = tmp_path / "flow.json"
    flow_file.write_text(json.dumps(flow))
    agent = Agent(data_root, broker.port).start()
    obs = Observer(broker.port, topics=("plc/#", "anomaly/#"))
    log = open(tmp_path / "node-red.log", "wb")
    nr = subprocess.Popen([exe, "--userDir", str(tmp_path / "nr"), "--port", str(free_port()), str(flow_file)],
                          env={**os.environ, "ANOMALY_ROI": "st1/tire"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b"Started flows" in (tmp_path / "node-red.log").read_bytes() or nr.poll() is not None, 90,
                 "Node-RED started")
        assert nr.poll() is None, (tmp_path / "node-red.log").read_text()[-3000:]
        wait_for(lambda: b"Connected to broker" in (tmp_path / "node-red.log").read_bytes(), 60, "Node-RED on MQTT")
        good = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[0]
        defect = sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[0]
        junk = tmp_path / "not-an-image.png"
        junk.write_text("this is text")
        for path in (good, defect, junk):
            obs.publish("anomaly-demo/inspect", str(path))

        def routed() -> dict[str, list[dict]]:
            out: dict[str, list[dict]] = {"ok": [], "ng": [], "error": []}
            with obs.lock:
                for topic, payload, _, _ in obs.messages:
                    if topic.startswith("plc/st1/tire/"):
                        out[topic.rsplit("/", 1)[1]].append(json.loads(payload))
            return out

        wait_for(lambda: all(routed().values()), 90, "three routed results")
        got = routed()
        assert got["ok"][0]["status"] == "ok" and not got["ok"][0]["data"]["is_anomaly"]
        assert got["ng"][0]["data"]["is_anomaly"] and got["ng"][0]["data"]["defects"]["count"] >= 1
        assert got["error"][0]["error"]["code"] == "unknown_format"
        assert all(r["request_id"].startswith("nodered-") for rs in got.values() for r in rs)
        with obs.lock:
            requests = [p for t, p, _, _ in obs.messages if t == "anomaly/st1/tire/predict"]
        assert len(requests) == 3 and json.loads(requests[0])["source"] == "node-red"
    finally:
        nr.terminate()
        try:
            nr.wait(timeout=20)
        except subprocess.TimeoutExpired:
            nr.kill()
        log.close()
        obs.close()
        agent.sigterm()
