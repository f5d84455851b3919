"""The integrator's contract on a running agent (real broker, real HTTP client, real images): /predict as
JSON with image_b64, one `backbone` shape in results, state and health, MQTT v5 content type on JSON
messages, `invalid_payload` for a raw payload that is no image, the same code over HTTP and MQTT for a
parameter neither can use, a ROI's default mm_per_px from the config,
and every refusal in the log at WARNING with its code, ROI and source."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker, free_port


def test_contract_details_an_integrator_relies_on(data_root: Path, tire: Path, broker: Broker) -> None:
    image = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[0].read_bytes()
    port = free_port()
    agent = Agent(data_root, broker.port, http_port=port,
                  env={"ANOMALY_AGENT_ROIS": json.dumps({"st1/tire": {"mm_per_px": 0.2}})}).start()
    obs = Observer(broker.port)
    try:
        with httpx.Client(base_url=agent.http, timeout=60) as c:
            multipart = c.post("/predict", data={"role_id": "st1", "roi_id": "tire", "request_id": "h-form"},
                               files={"file": ("g.png", image, "image/png")})
            as_json = c.post("/predict", json={"role_id": "st1", "roi_id": "tire", "request_id": "h-json",
                                               "image_b64": base64.b64encode(image).decode(), "heatmap": True})
            assert multipart.status_code == 200 and as_json.status_code == 200, (multipart.text, as_json.text)
            a, b = multipart.json(), as_json.json()
            # a heatmap request runs the exact search, one without it may run the certified one (banks past the
            # cut-over): equal within the documented 1e-6 (tests/test_knn_certified.py runs that case end to end)
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
            assert b["request_id"] == "h-json" and b["heatmap_png_b64"]
            assert a["mm_per_px"] == 0.2  # the ROI's configured default: the request carried none
            bad = c.post("/predict", json={"role_id": "st1", "roi_id": "tire", "image_b64": "!!"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_base64"
            missing = c.post("/predict", json={"roi_id": "tire", "image_b64": "AAAA"})
            assert missing.status_code == 422 and missing.json()["error"]["code"] == "invalid_field"
            garbage = c.post("/predict", data={"role_id": "st1", "roi_id": "tire", "heatmap": "garbage"},
                             files={"file": ("g.png", image, "image/png")})
            assert garbage.status_code == 422 and garbage.json()["error"]["code"] == "invalid_field", garbage.text
            health = c.get("/health").json()
            state = c.get("/models/st1/tire").json()
        assert a["backbone"] == state["backbone"] == health["backbone"]
        assert set(a["backbone"]) >= {"name", "resolution", "weights_sha256"}

        obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "m-1",
                                                            "image_b64": base64.b64encode(image).decode()}))
        obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "m-garbage", "heatmap": "garbage",
                                                            "image_b64": base64.b64encode(image).decode()}))
        obs.publish("anomaly/st1/tire/predict", b"GIF89a this is not one of the accepted images")
        obs.publish("anomaly/st1/never_fitted/predict", json.dumps({"request_id": "m-nf", "source": "cam-9",
                                                                    "image_b64": base64.b64encode(image).decode()}))
        m1 = obs.wait_result("m-1")
        assert m1["data"]["backbone"] == a["backbone"] and m1["data"]["mm_per_px"] == 0.2
        assert obs.wait_result("m-nf")["error"]["code"] == "model_not_fitted"
        # one request-parameter schema (agent/jobs.py Params): the value HTTP refuses, MQTT refuses with the same
        # code, instead of reading it as "no heatmap"
        assert obs.wait_result("m-garbage")["error"]["code"] == "invalid_field"
        wait_for(lambda: any(r.get("error", {}).get("code") == "invalid_payload" for r in obs.results()), 30,
                 "invalid_payload")
        with obs.lock:
            props = [p for t, _, _, p in obs.messages if t.endswith("/result") or t.endswith("/state")]
        assert props and all(getattr(p, "ContentType", None) == "application/json" for p in props)
        log = agent.log.read_text()
        assert "WARNING agent.worker: mqtt: refused predict st1/never_fitted (request m-nf, source cam-9): " \
               "model_not_fitted" in log, log[-3000:]
        assert "WARNING" in log and "invalid_payload" in log
    finally:
        obs.close()
        agent.sigterm()
