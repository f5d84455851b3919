"""Security end to end: MQTT over TLS with a test CA, username/password and an ACL in a real Mosquitto;
the password never reaches the log; nobody without rights can make the agent act."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker

AGENT_PASSWORD = "agent-pw-7c1f3e"  # noqa: S105 - a test broker's credential


def test_mqtt_over_tls_with_password_and_acl(tmp_path: Path, tire: Path) -> None:
    rw = ["topic readwrite anomaly/#"]
    broker = Broker(tmp_path / "broker", secure=True, users={
        "agent": (AGENT_PASSWORD, rw), "station": ("station-pw", rw),
        "viewer": ("viewer-pw", ["topic read anomaly/#"])})  # may watch results, may not ask for anything
    broker.start()
    secret = tmp_path / "mqtt.pass"
    secret.write_text(AGENT_PASSWORD + "\n")
    secret.chmod(0o600)
    agent = Agent(tmp_path / "data", broker.port, env={
        "ANOMALY_AGENT_MQTT__USERNAME": "agent", "ANOMALY_AGENT_MQTT__PASSWORD_FILE": str(secret),
        "ANOMALY_AGENT_MQTT__TLS": json.dumps({"ca": str(broker.ca)})}).start()
    station = Observer(broker.port, ca=broker.ca, auth=("station", "station-pw"))
    viewer = Observer(broker.port, ca=broker.ca, auth=("viewer", "viewer-pw"))
    try:
        good = sorted((tire / "train" / "good" / "rgb").glob("*.png"))
        station.publish("anomaly/st1/tire/fit_ok", json.dumps({"request_id": "fit", "images_b64": [
            base64.b64encode(p.read_bytes()).decode() for p in good[:4]]}))
        assert station.wait_result("fit", 120)["status"] == "ok"
        assert viewer.wait_result("fit", 10)["data"]["samples"]["ok"] == 4  # read rights: sees results
        # the viewer's request is dropped by the broker's ACL: the agent never sees it
        viewer.publish("anomaly/st1/tire/calibrate", json.dumps({"request_id": "intrude", "threshold": 99}))
        station.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "p1", "image_b64":
                                                                base64.b64encode(good[5].read_bytes()).decode()}))
        res = station.wait_result("p1", 60)
        assert res["status"] == "ok" and res["data"]["threshold"] != 99
        time.sleep(1)
        assert "intrude" not in {r["request_id"] for r in station.results()}
        # no anonymous client, no plain-text port
        anon = Observer(broker.port, ca=broker.ca)
        time.sleep(0.5)
        assert not anon.client.is_connected()
        anon.close()
        assert agent.sigterm() == 0
        log = agent.log.read_text()
        assert "connected to 127.0.0.1" in log and AGENT_PASSWORD not in log
        # samples, models and results are product data: nothing the agent wrote is readable by others
        written = list((tmp_path / "data").rglob("*"))
        assert written and all(not (p.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH)) for p in written), [
            (str(p), oct(p.stat().st_mode)) for p in written if p.stat().st_mode & stat.S_IROTH][:5]
    finally:
        station.close()
        viewer.close()
        broker.stop()


def test_a_wrong_password_is_reported_and_retried_not_fatal(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", secure=True, users={"agent": (AGENT_PASSWORD, ["topic readwrite #"])})
    broker.start()
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-the-password")
    agent = Agent(tmp_path / "data", broker.port, env={
        "ANOMALY_AGENT_MQTT__USERNAME": "agent", "ANOMALY_AGENT_MQTT__PASSWORD_FILE": str(wrong),
        "ANOMALY_AGENT_MQTT__TLS": json.dumps({"ca": str(broker.ca)})}).start()
    try:
        wait_for(lambda: "connection refused" in agent.log.read_text(), 30, "a refused-connection log line")
        assert agent.alive() and "not-the-password" not in agent.log.read_text()
        assert agent.sigterm() == 0
    finally:
        broker.stop()
