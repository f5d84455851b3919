"""The lifecycle from every ingress of a running agent (real broker, real HTTP client, real images): list,
fetch and delete samples over HTTP, delete_samples and rollback over MQTT, a conflicting label refused
and then relabelled, export / import between ROIs, and the drift state on the state topic, /models and
/metrics while good parts brighten."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker, free_port
from tests.test_http import error_of, form, metric_samples, uploads

ROLE, ROI = "st1", "tire"


@pytest.fixture(scope="module")
def files(real_tire: Path) -> dict[str, list[Path]]:
    """Real images: the drift steps this test drives by brightening follow from their statistics."""
    tire = real_tire
    return {"train": sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:10],
            "good": sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:10],
            "cut": sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[:2]}


def png(path: Path, gain: float = 1.0) -> bytes:
    img = np.clip(cv2.imread(str(path)).astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def test_lifecycle_over_http_and_mqtt_and_drift_on_every_channel(tmp_path: Path, files, broker: Broker) -> None:
    port = free_port()
    agent = Agent(tmp_path / "data", port=broker.port, http_port=port, env={
        "ANOMALY_AGENT_DRIFT__WINDOW": "10", "ANOMALY_AGENT_DRIFT__MIN_PREDICTIONS": "5"}).start()
    obs = Observer(broker.port)
    base = f"anomaly/{ROLE}/{ROI}"
    try:
        with httpx.Client(base_url=agent.http, timeout=120) as c:
            r = c.post("/fit_ok", data=form(source="line"), files=uploads(files["train"]))
            assert r.status_code == 200, r.text
            v_clean, t_clean = r.json()["model_version"], r.json()["threshold"]
            bad = c.post("/fit_ok", data=form(request_id="oops"), files=uploads(files["cut"][:1]))
            assert bad.status_code == 200 and bad.json()["versions"] == [v_clean, v_clean + 1]

            listed = c.get(f"/samples/{ROLE}/{ROI}").json()
            assert len(listed) == 11 and all(x["kind"] == "ok" for x in listed)
            cut = next(x for x in listed if x["request_id"] == "oops")
            assert set(cut) >= {"sample_id", "kind", "sha256", "source", "timestamp_utc", "mm_per_px", "loo_score"}
            fetched = c.get(f"/samples/{ROLE}/{ROI}/{cut['sample_id']}")
            assert fetched.status_code == 200 and fetched.content == files["cut"][0].read_bytes()
            assert fetched.headers["content-type"] == "image/png"

            gone = c.delete(f"/samples/{ROLE}/{ROI}/{cut['sample_id']}", params={"request_id": "del-1"})
            assert gone.status_code == 200, gone.text
            assert gone.json()["deleted"]["ok"] == [cut["sample_id"]] and gone.json()["samples"]["ok"] == 10
            assert gone.json()["threshold"] == pytest.approx(t_clean, abs=1e-6)
            assert error_of(c.delete(f"/samples/{ROLE}/{ROI}/{cut['sample_id']}")) == "unknown_sample"
            assert c.get(f"/samples/{ROLE}/{ROI}/{cut['sample_id']}").status_code == 200  # still in the trash

            # MQTT: delete_samples with an unknown id, then rollback to the poisoned version and back
            obs.publish(f"{base}/delete_samples", json.dumps({"request_id": "m-del", "sample_ids": ["nope_1"]}))
            assert obs.wait_result("m-del")["error"]["code"] == "unknown_sample"
            obs.publish(f"{base}/rollback", json.dumps({"request_id": "m-rb", "version": v_clean + 1}))
            rb = obs.wait_result("m-rb")
            assert rb["status"] == "ok" and rb["data"]["rolled_back_to"] == v_clean + 1
            assert rb["data"]["samples"]["ok"] == 11
            obs.publish(f"{base}/rollback", json.dumps({"request_id": "m-rb2", "version": v_clean}))
            back = obs.wait_result("m-rb2")["data"]
            assert back["samples"]["ok"] == 10 and back["threshold"] == pytest.approx(t_clean, abs=1e-9)
            state = wait_for(lambda: [s for s in obs.results("/state") if s.get("rollback_of") == v_clean], 30,
                             "state after the rollback")[-1]
            assert state["model_version"] == back["model_version"] and state["versions"][-1] == state["model_version"]

            # the same image as OK and as NG: refused, then moved with relabel
            same = files["train"][0]
            refused = c.post("/send_ng", data=form(), files=uploads([same]))
            assert refused.status_code == 409 and error_of(refused) == "conflicting_label"
            moved = c.post("/send_ng", data=form(relabel="true"), files=uploads([same]))
            assert moved.status_code == 200 and moved.json()["samples"] == {"ok": 9, "ng": 1}

            # export, import under another ROI id: the same scores
            archive = c.get(f"/export/{ROLE}/{ROI}")
            assert archive.status_code == 200 and archive.headers["content-type"] == "application/gzip"
            imp = c.post("/import", data={"role_id": ROLE, "roi_id": "tire_copy"},
                         files=[("file", ("a.tar.gz", archive.content, "application/gzip"))])
            assert imp.status_code == 200, imp.text
            again = c.post("/import", data={"role_id": ROLE, "roi_id": "tire_copy"},
                           files=[("file", ("a.tar.gz", archive.content, "application/gzip"))])
            assert again.status_code == 409 and error_of(again) == "roi_exists"
            p = files["good"][0]
            a = c.post("/predict", data=form(), files=uploads([p], "file")).json()
            b = c.post("/predict", data=form(roi="tire_copy"), files=uploads([p], "file")).json()
            assert b["score"] == pytest.approx(a["score"], abs=1e-6) and b["threshold"] == a["threshold"]
            log = agent.log.read_text()  # embedded during the import (off the worker), not at its first request
            marker = f"import of {ROLE}/tire_copy: samples embedded"
            assert marker in log and "tire_copy: indexing" not in log.split(marker, 1)[1]  # not again at its use
            assert error_of(c.post("/rollback", data=form(roi="tire_copy", version=999))) == "unknown_version"
            wiped = c.post("/reset", data=form(roi="tire_copy"))
            assert wiped.status_code == 200 and wiped.json()["samples"] == {"ok": 0, "ng": 0}
            assert error_of(c.post("/predict", data=form(roi="tire_copy"), files=uploads([p], "file"))) == \
                "model_not_fitted"
            undo = c.post("/rollback", data=form(roi="tire_copy", version=wiped.json()["model_version"] - 1))
            assert undo.status_code == 200 and undo.json()["samples"] == {"ok": 9, "ng": 1}

            # drift: good parts brightening step by step; the state reaches every channel
            seen = []
            for gain in (1.0, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2):
                for path in files["good"]:
                    rp = c.post("/predict", data=form(), files=[("file", (path.name, png(path, gain), "image/png"))])
                    assert rp.status_code == 200
                seen.append(next(m for m in c.get("/models").json() if m["roi_id"] == ROI)["drift"]["state"])
            assert seen[0] == "ok" and "alarm" in seen, seen
            drift_states = [s["drift"]["state"] for s in obs.results("/state") if s.get("drift")]
            assert "alarm" in drift_states, drift_states
            metrics = metric_samples(c.get("/metrics").text)
            assert metrics[("anomaly_agent_drift_state", (("roi_id", ROI), ("role_id", ROLE)))] == 2
            html = c.get("/").text
            assert "drift alarm" in html and "versions kept" in html
            assert "drift ok -> " in agent.log.read_text() or "drift warning -> alarm" in agent.log.read_text()
    finally:
        obs.close()
        agent.sigterm()
