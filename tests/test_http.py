"""End to end over HTTP: `anomaly-agent run` as a subprocess with HTTP, the watched folder and MQTT on,
a real HTTP client, a real Mosquitto broker, real images and the real EfficientNet-Lite0.

The HTTP requests go through the same queue and worker as folder and MQTT requests: a sample sent
over HTTP is seen by a prediction asked over MQTT or the folder, and the reverse.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_proc import SHIPPED, Agent, Observer, wait_for
from tests.broker import Broker, free_port
from tests.test_daemon import drop

ROLE, ROI = "st1", "tire"


@pytest.fixture(scope="module")
def files(tire: Path) -> dict[str, list[Path]]:
    return {"train": sorted((tire / "train" / "good" / "rgb").glob("*.png")),
            "good": sorted((tire / "test" / "good" / "rgb").glob("*.png")),
            "hole": sorted((tire / "test" / "hole" / "rgb").glob("*.png")),
            "cut": sorted((tire / "test" / "cut" / "rgb").glob("*.png"))}


def form(role: str = ROLE, roi: str = ROI, **fields: object) -> dict[str, str]:
    return {"role_id": role, "roi_id": roi, **{k: str(v) for k, v in fields.items() if v is not None}}


def uploads(paths: list[Path], field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (p.name, p.read_bytes(), "image/png")) for p in paths]


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    return body["error"]["code"]


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def chromium_command(tmp_path: Path) -> tuple[str, list[str]]:
    """Debian's Chromium, headless, with a fresh profile and no background traffic."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
        pytest.skip("chromium not installed")
    return chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync",
                      f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,1600", "--hide-scrollbars"]


def test_http_fit_predict_calibrate_metrics_and_one_pipeline_with_mqtt_and_folder(tmp_path: Path, files) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    port = free_port()
    agent = Agent(tmp_path / "data", port=broker.port, http_port=port, env={
        "ANOMALY_AGENT_LIMITS__MAX_BYTES": "1000000", "ANOMALY_AGENT_HTTP__MAX_REQUEST_BYTES": "4000000"}).start()
    obs = Observer(broker.port)
    try:
        with httpx.Client(base_url=agent.http, timeout=120) as c:
            # fit_ok: several files in one request, stored exactly like the other ingresses
            r = c.post("/fit_ok", data=form(mm_per_px=0.1, source="gui-7", request_id="fit-1"),
                       files=uploads(files["train"][:6]))
            assert r.status_code == 200, r.text
            st = r.json()
            assert st["request_id"] == "fit-1" and r.headers["x-request-id"] == "fit-1"
            assert st["added"] == 6 and st["samples"] == {"ok": 6, "ng": 0} and st["model_version"] == 1
            assert st["threshold"] > 0 and st["threshold_method"] == "ok_percentile"
            metas = [json.loads(p.read_text()) for p in
                     (agent.data_root / "models" / ROLE / ROI / "samples" / "ok").glob("*.json")]
            assert len(metas) == 6
            assert all(m["role_id"] == ROLE and m["roi_id"] == ROI and m["mm_per_px"] == 0.1 and m["source"] == "gui-7"
                       and m["timestamp_utc"] for m in metas), metas[0]

            # predict: the MQTT result's data object, with a heatmap on request
            good = c.post("/predict", data=form(mm_per_px=0.1, request_id="p-good"),
                          files=uploads(files["good"][:1], "file"))
            hole = c.post("/predict", data=form(mm_per_px=0.1, heatmap="true"),
                          files=uploads(files["cut"][:1], "file"))
            assert good.status_code == 200 and hole.status_code == 200, (good.text, hole.text)
            g, h = good.json(), hole.json()
            for d in (g, h):
                assert {"is_anomaly", "score", "threshold", "inference_ms", "model_version", "mm_per_px",
                        "defects", "timings_ms"} <= set(d) and d["model_version"] == 1 and d["mm_per_px"] == 0.1
            assert g["request_id"] == "p-good" and h["request_id"].startswith("http-")
            assert "heatmap_png_b64" not in g
            png = cv2.imdecode(np.frombuffer(base64.b64decode(h["heatmap_png_b64"]), np.uint8), cv2.IMREAD_COLOR)
            assert png.shape[:2] == (512, 384)
            assert h["is_anomaly"] and not g["is_anomaly"] and h["defects"]["count"] >= 1, (h, g)
            assert h["defects"]["total_area_mm2"] > 0

            # an HTTP result is published on MQTT too (a PLC listens there whatever the station speaks)
            mirrored = obs.wait_result("p-good")
            assert mirrored["data"]["score"] == g["score"] and mirrored["action"] == "predict"

            # the same ROI over MQTT and the folder: same model, same score for the same image
            obs.publish(f"anomaly/{ROLE}/{ROI}/predict", json.dumps({
                "request_id": "m-1", "mm_per_px": 0.1,
                "image_b64": base64.b64encode(files["good"][0].read_bytes()).decode()}))
            m = obs.wait_result("m-1")
            assert m["status"] == "ok" and m["data"]["model_version"] == 1
            assert m["data"]["score"] == pytest.approx(g["score"], abs=1e-5)
            drop(agent.data_root / "inbox" / ROLE / ROI / "predict", "f-1.png", files["good"][0].read_bytes())
            res = agent.data_root / "results" / ROLE / ROI / "f-1.json"
            folder = json.loads(wait_for(lambda: res.exists() and res.read_text(), 60, "folder result"))
            assert folder["data"]["score"] == pytest.approx(g["score"], abs=1e-5)
            # ... and an OK sample sent over MQTT is part of the model that HTTP sees
            obs.publish(f"anomaly/{ROLE}/{ROI}/fit_ok", json.dumps({
                "request_id": "m-fit", "image_b64": base64.b64encode(files["train"][6].read_bytes()).decode()}))
            assert obs.wait_result("m-fit")["data"]["samples"]["ok"] == 7
            models = c.get("/models").json()
            assert [(s["role_id"], s["roi_id"], s["samples"]["ok"]) for s in models] == [(ROLE, ROI, 7)]
            one = c.get(f"/models/{ROLE}/{ROI}").json()
            assert one["model_version"] == 2 and one["threshold_policy"]["source"] == "config"

            # NG samples and calibration
            ng = c.post("/send_ng", data=form(), files=uploads(files["hole"][1:4]))
            assert ng.status_code == 200 and ng.json()["samples"]["ng"] == 3
            assert ng.json()["threshold_method"] == "ng_calibrated"
            cal = c.post("/calibrate", data=form(policy="ok_only", ok_percentile=100)).json()
            assert cal["threshold_method"] == "ok_percentile" and cal["threshold_policy"]["policy"] == "ok_only"
            assert cal["threshold"] == pytest.approx(cal["threshold_details"]["ok_max"])
            man = c.post("/calibrate", data=form(policy="manual", threshold=0.9)).json()
            assert man["threshold"] == 0.9 and man["threshold_method"] == "manual_override"
            back = c.post("/calibrate", data=form(policy="config")).json()
            assert back["threshold_method"] == "ng_calibrated" and back["threshold_policy"]["source"] == "config"
            after = c.post("/predict", data=form(request_id="Prüfteil 日本-1"),
                           files=uploads(files["good"][:1], "file"))
            assert after.json()["request_id"] == "Prüfteil 日本-1" and "x-request-id" not in after.headers
            after = after.json()
            assert after["threshold"] == pytest.approx(back["threshold"], abs=1e-6)

            # every error status, in the one error shape, with the other ingresses' codes
            img = files["good"][1].read_bytes()
            cases = [
                (dict(data=form(), files=[("file", ("t.png", img[:4000], "image/png"))]), 400, "truncated_file"),
                (dict(data=form(), files=[("file", ("e.png", b"", "image/png"))]), 400, "empty_file"),
                (dict(data=form(roi="never-fitted"), files=[("file", ("g.png", img, "image/png"))]), 404,
                 "model_not_fitted"),
                (dict(data=form(), files=[("file", ("big.png", b"\x89PNG" + os.urandom(1_100_000), "image/png"))]),
                 413, "file_too_large"),
                (dict(data=form(), files=[("file", ("x.txt", b"hello, not an image", "text/plain"))]), 415,
                 "unknown_format"),
                (dict(data={"roi_id": ROI}, files=[("file", ("g.png", img, "image/png"))]), 422, "invalid_field"),
                (dict(data=form(mm_per_px="abc"), files=[("file", ("g.png", img, "image/png"))]), 422, "invalid_field"),
                (dict(data=form(mm_per_px=-2), files=[("file", ("g.png", img, "image/png"))]), 422,
                 "invalid_mm_per_px"),
                (dict(data=form(role="../etc"), files=[("file", ("g.png", img, "image/png"))]), 422, "invalid_id"),
            ]
            for kwargs, status, code in cases:
                r = c.post("/predict", **kwargs)
                assert (r.status_code, error_of(r)) == (status, code), r.text
            r = c.post("/predict", data=form(), files=[("file", ("huge.png", os.urandom(5_000_000), "image/png"))])
            assert (r.status_code, error_of(r)) == (413, "payload_too_large")
            r = c.post("/calibrate", data=form(policy="sometimes"))
            assert (r.status_code, error_of(r)) == (422, "invalid_field")
            r = c.post("/calibrate", data=form(policy="manual", threshold=-1))
            assert (r.status_code, error_of(r)) == (422, "invalid_threshold")
            r = c.get("/models/st1/nothing")
            assert (r.status_code, error_of(r)) == (404, "unknown_roi")
            assert not (agent.data_root / "models" / ROLE / "never-fitted").exists()  # nothing made for strangers
            assert c.get("/health").json()["status"] == "online" and "outbox" in c.get("/health").json()

            # metrics, read by the Prometheus text parser
            text = c.get("/metrics")
            assert text.headers["content-type"].startswith("text/plain")
            ms = metric_samples(text.text)
            def requests(action: str, ingress: str, status: str = "ok", code: str = "") -> float:
                labels = (("action", action), ("code", code), ("ingress", ingress), ("status", status))
                return ms.get(("anomaly_agent_requests_total", labels), 0.0)

            assert [requests("predict", ingress) for ingress in ("http", "mqtt", "folder")] == [3, 1, 1]
            assert requests("fit_ok", "http") == 1 and requests("fit_ok", "mqtt") == 1
            assert requests("predict", "http", "error", "file_too_large") == 1
            assert requests("predict", "http", "error", "payload_too_large") == 1
            assert requests("predict", "http", "error", "invalid_field") == 2
            for stage in ("preprocess", "backbone", "knn", "postprocess"):
                assert ms[("anomaly_agent_inference_stage_seconds_count", (("stage", stage),))] == 5
                assert ms[("anomaly_agent_inference_stage_seconds_sum", (("stage", stage),))] > 0
            assert ms[("anomaly_agent_batch_size_count", ())] == 5
            assert ms[("anomaly_agent_queue_depth", ())] == 0
            assert ms[("anomaly_agent_samples", (("kind", "ok"), ("roi_id", ROI), ("role_id", ROLE)))] == 7
            assert ms[("anomaly_agent_samples", (("kind", "ng"), ("roi_id", ROI), ("role_id", ROLE)))] == 3
            assert ms[("anomaly_agent_backbone_info", (("backbone", "efficientnet_lite0"), ("device", "cpu"),
                                                        ("resolution", "192")))] == 1

            # the OpenAPI page documents every endpoint
            paths = c.get("/openapi.json").json()["paths"]
            assert {"/fit_ok", "/send_ng", "/predict", "/calibrate", "/models", "/models/{role_id}/{roi_id}",
                    "/health", "/metrics"} <= set(paths)
            # ... and the API page renders in a browser offline (Swagger UI from the package, no CDN)
            chromium, flags = chromium_command(tmp_path)
            api = subprocess.run([chromium, *flags, "--virtual-time-budget=8000", "--dump-dom", f"{agent.http}/docs"],
                                 capture_output=True, text=True, timeout=120)
            rendered = set(re.findall(r'data-path="([^"]+)"', api.stdout))
            assert {"/fit_ok", "/send_ng", "/predict", "/calibrate", "/models", "/health", "/metrics"} <= rendered, \
                api.stdout[-2000:]

        # SIGTERM while a fit is in flight: the request still gets its answer, the agent exits 0
        box: dict = {}

        def slow_fit() -> None:
            with httpx.Client(base_url=agent.http, timeout=120) as c2:
                box["r"] = c2.post("/fit_ok", data=form(roi="late"), files=uploads(files["train"][10:22]))

        t = threading.Thread(target=slow_fit)
        t.start()
        late = agent.data_root / "models" / ROLE / "late" / "samples" / "ok"
        wait_for(lambda: late.is_dir() and any(late.glob("*.json")), 30, "the fit to start")
        assert agent.sigterm() == 0
        t.join(30)
        assert box["r"].status_code == 200 and box["r"].json()["samples"]["ok"] == 12
    finally:
        obs.close()
        broker.stop()


def test_http_token_queue_full_and_operator_page_in_chromium(tmp_path: Path, files) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    port = free_port()
    agent = Agent(tmp_path / "data", http_port=port, env={
        "ANOMALY_AGENT_HTTP__TOKEN_FILE": str(token), "ANOMALY_AGENT_WORKER__QUEUE_SIZE": "1",
        "ANOMALY_AGENT_HTTP__PAGE_REFRESH_S": "0"}).start()
    auth = {"Authorization": "Bearer s3cret-token"}
    with httpx.Client(base_url=agent.http, timeout=120) as c:
        assert c.get("/health").status_code == 200  # the one open endpoint
        for path in ("/models", "/metrics", "/", "/docs"):
            r = c.get(path)
            assert (r.status_code, error_of(r)) == (401, "unauthorized"), path
            assert "Basic" in r.headers.get_list("www-authenticate")[0]
        assert c.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post("/predict", data=form(), files=uploads(files["good"][:1], "file"))
        assert r.status_code == 401
        assert c.get("/models", headers=auth).json() == []
        assert c.get("/models", auth=("operator", "s3cret-token")).status_code == 200  # a browser's Basic prompt
        for probe in ("/wp-login.php", "/admin/../x", "/cgi-bin/a"):  # scanners: counted, but as one label
            assert c.get(probe).status_code == 401
        refused = metric_samples(c.get("/metrics", headers=auth).text)
        assert refused[("anomaly_agent_requests_total", (("action", "other"), ("code", "unauthorized"),
                                                         ("ingress", "http"), ("status", "error")))] == 3

        fit = c.post("/fit_ok", headers=auth, data=form(mm_per_px=0.05), files=uploads(files["train"][:8]))
        assert fit.status_code == 200, fit.text

        # queue of 1: while a long fit of another ROI runs, one predict waits in the queue, the rest get 503;
        # the waiting one is answered between the fit's steps, long before the fit ends
        def predict(i: int) -> httpx.Response:
            return c.post("/predict", headers=auth, data=form(mm_per_px=0.05, heatmap="false"),
                          files=uploads(files["hole" if i % 2 else "good"][i:i + 1], "file"))

        def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
            r = call()
            return r, time.monotonic()

        with ThreadPoolExecutor(8) as pool:
            big = pool.submit(timed, lambda: c.post("/fit_ok", headers=auth, data=form(roi="other"),
                                                    files=uploads(files["train"][20:60])))
            other = agent.data_root / "models" / ROLE / "other" / "samples" / "ok"
            wait_for(lambda: other.is_dir() and any(other.glob("*.json")), 60, "the big fit to start")
            answers = list(pool.map(lambda i: timed(lambda: predict(i)), range(6)))
            fit, fit_done = big.result()
        assert fit.status_code == 200 and fit.json()["samples"]["ok"] == 40 and fit.json()["steps"] == 5
        statuses = sorted(r.status_code for r, _ in answers)
        assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}, statuses
        assert all(error_of(r) == "queue_full" and r.headers["retry-after"] for r, _ in answers
                   if r.status_code == 503)
        assert max(t for r, t in answers if r.status_code == 200) < fit_done - 0.5
        for i in range(4):  # enough results for the page, one after the other
            assert predict(i).status_code == 200

        # the operator page, rendered by a real headless browser
        chromium, flags = chromium_command(tmp_path)
        url = f"http://operator:s3cret-token@127.0.0.1:{port}/"
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'id="roi-st1-tire"' in html and 'id="roi-st1-other"' in html
        assert html.count('class="card result') >= 6 and html.count("/ui/heatmap/") >= 4
        assert 'class="scores"' in html and 'class="threshold"' in html and 'class="recent"' in html
        st = c.get(f"/models/{ROLE}/{ROI}", headers=auth).json()
        assert f"{st['threshold']:.4g}" in html and "ok_percentile" in html
        shot = tmp_path / "page.png"
        r = subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
        page = cv2.imread(str(shot))
        assert page.shape[:2] == (1600, 1280)
        # the heatmaps were loaded and drawn: plenty of strongly coloured (blue/green/red) pixels
        hsv = cv2.cvtColor(page, cv2.COLOR_BGR2HSV)
        assert ((hsv[..., 1] > 120) & (hsv[..., 2] > 60)).mean() > 0.05
        first = html.split("/ui/heatmap/")[1].split(".png")[0]
        img = c.get(f"/ui/heatmap/{first}.png", headers=auth)
        assert img.headers["content-type"] == "image/png"
        assert cv2.imdecode(np.frombuffer(img.content, np.uint8), cv2.IMREAD_COLOR) is not None
        shutil.copy(shot, Path(os.environ.get("ANOMALY_SCREENSHOT_DIR", tmp_path)) / "operator_page.png")


def test_unusable_token_file_stops_the_start_with_the_key_named(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("  \n")
    for path, words in ((empty, "is empty"), (tmp_path / "missing", "cannot read")):
        r = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(SHIPPED), "--data-root",
                            str(tmp_path / "d"), "run"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "ANOMALY_AGENT_HTTP__ENABLED": "true",
                                "ANOMALY_AGENT_HTTP__TOKEN_FILE": str(path)})
        assert r.returncode == 2 and "http.token_file" in r.stderr and words in r.stderr, r.stderr


def test_https_with_a_token_and_a_clear_error_for_a_bad_certificate(tmp_path: Path, files) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    (tmp_path / "token").write_text("t0ken")
    port = free_port()
    tls = {"ANOMALY_AGENT_HTTP__TLS": json.dumps({"cert": str(cert), "key": str(key)}),
           "ANOMALY_AGENT_HTTP__TOKEN_FILE": str(tmp_path / "token")}
    agent = Agent(tmp_path / "data", http_port=port, env=tls).start()
    trust = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust, timeout=60) as c:
        assert c.get("/models").status_code == 401
        r = c.post("/fit_ok", headers={"Authorization": "Bearer t0ken"}, data=form(),
                   files=uploads(files["train"][:2]))
        assert r.status_code == 200 and r.json()["samples"]["ok"] == 2
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on that port
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    assert agent.sigterm() == 0
    # a key that does not belong to the certificate: the start fails and says why
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
    bad = Agent(tmp_path / "data2", http_port=free_port(), client_id="bad", env={
        "ANOMALY_AGENT_HTTP__TLS": json.dumps({"cert": str(cert), "key": str(other)})}).start(wait_ready=False)
    assert bad.proc.wait(timeout=120) == 1
    assert "http: could not serve on" in bad.log.read_text() and "SSLError" in bad.log.read_text()
