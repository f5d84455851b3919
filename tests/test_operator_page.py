"""The operator page in a real headless Chromium at 1366x768, behind a token: per-ROI verdict, NG rate and
trend, a result labelled NG by clicking its button (the sample is stored), a threshold previewed and then
applied (a manual calibration that says it came from the page), POST /label as an API. Screenshots go to
$ANOMALY_SCREENSHOT_DIR (or the test's directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

from tests.agent_proc import Agent, wait_for
from tests.broker import free_port
from tests.cdp import Chromium
from tests.test_http import chromium_command, error_of, form, uploads


def shots_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("ANOMALY_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_label_a_result_and_preview_a_threshold_in_chromium(tmp_path: Path, tire: Path) -> None:
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:8]
    good = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:4]
    cut = sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[:2]
    token = tmp_path / "token"
    token.write_text("page-token\n")
    port = free_port()
    agent = Agent(tmp_path / "data", http_port=port, env={"ANOMALY_AGENT_HTTP__TOKEN_FILE": str(token),
                                                          "ANOMALY_AGENT_HTTP__PAGE_REFRESH_S": "0"}).start()
    auth = {"Authorization": "Bearer page-token"}
    chromium, flags = chromium_command(tmp_path)
    browser = Chromium(chromium, flags)
    base = f"http://operator:page-token@127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=agent.http, timeout=120, headers=auth) as c:
            assert c.post("/fit_ok", data=form(), files=uploads(train)).status_code == 200
            names = []
            for i, p in enumerate([*good, *cut]):
                r = c.post("/predict", data=form(request_id=f"part-{i}"),
                           files=[("file", (f"cam1_part_{i}.png", p.read_bytes(), "image/png"))])
                assert r.status_code == 200
                names.append(f"cam1_part_{i}.png")
            before = c.get("/models/st1/tire").json()

            browser.open(base + "/")
            html = browser.evaluate("document.documentElement.outerHTML")
            assert all(n in html for n in names)  # the file names, not only http-<uuid>
            assert 'class="trend"' in html and "NG rate" in html and 'class="ng verdict"' in html
            assert html.count('src="/ui/image/') == 6 and html.count('src="/ui/heatmap/') == 6
            assert html.count("label-ok") == 6 and 'class="scale"' in html
            width = browser.evaluate("document.documentElement.scrollWidth")
            assert width <= 1366, width  # usable at 1366x768: nothing wider than the screen
            browser.screenshot(shots_dir(tmp_path) / "operator_page_1366x768.png")
            shot = cv2.imread(str(shots_dir(tmp_path) / "operator_page_1366x768.png"))
            assert shot.shape[:2] == (768, 1366)
            loaded = browser.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length")
            assert loaded == 12, loaded  # every image and heatmap came through the token

            # a good part the model flagged, or any result: labelled NG by its button in the page
            browser.click('[data-request="part-5"] button.label-ng')  # cam1_part_5: a cut
            page = browser.evaluate("document.body.innerText")
            assert "part-5 stored as NG" in page, page[:500]
            after = c.get("/models/st1/tire").json()
            assert after["samples"] == {"ok": 8, "ng": 1} and after["model_version"] > before["model_version"]
            stored = c.get("/samples/st1/tire").json()
            ng = [s for s in stored if s["kind"] == "ng"]
            assert len(ng) == 1 and ng[0]["source"].startswith("operator page")
            assert "labelled NG" in browser.evaluate("document.body.innerText")
            browser.screenshot(shots_dir(tmp_path) / "operator_page_after_label.png")

            # preview a threshold for one ROI, then apply it
            th = after["threshold"]
            browser.open(f"{base}/?roi=st1/tire&preview={th * 0.5:.6f}")
            text = browser.evaluate("document.body.innerText")
            assert "OK samples flagged" in text and "would turn NG" in text and "NG samples would pass" in text
            browser.screenshot(shots_dir(tmp_path) / "operator_page_preview.png")
            browser.click("button.apply")
            state = c.get("/models/st1/tire").json()
            assert state["threshold"] == float(f"{th * 0.5:.6f}") and state["threshold_method"] == "manual_override"
            assert state["threshold_details"]["set_by"].startswith("http: operator page")
            assert state["threshold_details"]["previous"] == th

            # the label endpoint as an API, and a result that is no longer kept
            r = c.post("/label", data={"request_id": "part-0", "label": "ok"})
            assert r.status_code == 200 and r.json()["samples"]["ok"] == 9
            r = c.post("/label", data={"request_id": "never-seen", "label": "ok"})
            assert (r.status_code, error_of(r)) == (404, "unknown_request")
            assert c.post("/label", data={"request_id": "part-1", "label": "maybe"}).status_code == 422
        assert httpx.post(f"{agent.http}/label", data={"request_id": "part-1", "label": "ok"}).status_code == 401
        _cross_site_posts_are_refused(agent, browser, port)
        recent = sorted((agent.data_root / "recent").iterdir())
        assert 0 < len(recent) <= 20  # the images kept for labelling are bounded by http.recent_results
    finally:
        browser.close()
        agent.sigterm()
    img = cv2.imread(str(shots_dir(tmp_path) / "operator_page_after_label.png"))
    assert img is not None and np.asarray(img).std() > 10
    shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


EVIL = """<!doctype html><html><body><form id="f" method="post" action="{target}/ui/threshold">
<input name="role_id" value="st1"><input name="roi_id" value="tire"><input name="threshold" value="1e308"></form>
<script>document.getElementById('f').submit()</script></body></html>"""


def _cross_site_posts_are_refused(agent: Agent, browser: Chromium, port: int) -> None:
    """A page on another origin that makes the operator's browser post to the agent changes nothing; the
    same posts made by hand with the operator's Basic credentials are refused 403; the page cannot be framed."""
    basic = httpx.BasicAuth("operator", "page-token")
    with httpx.Client(base_url=agent.http, timeout=60, auth=basic) as c:
        before = c.get("/models/st1/tire").json()["threshold"]
        page = c.get("/")
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        token = page.cookies.get("aa_csrf")
        assert token and f'name="csrf" value="{token}"' in page.text

        evil_port = free_port()
        evil_dir = agent.data_root.parent / "evil"
        evil_dir.mkdir(exist_ok=True)
        (evil_dir / "index.html").write_text(EVIL.format(target=f"http://operator:page-token@127.0.0.1:{port}"))
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(evil_port), "--bind", "127.0.0.1"],
                                  cwd=evil_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _up(evil_port), 20, "the other site")
            browser.open(f"http://127.0.0.1:{evil_port}/index.html")
            time.sleep(1.5)  # the form posts itself on load
        finally:
            server.terminate()
            server.wait(10)
        assert c.get("/models/st1/tire").json()["threshold"] == before  # the browser's cross-site post did nothing
        refused = [line for line in agent.log.read_text().splitlines() if "POST /ui/threshold" in line
                   and ("403 cross_site" in line or "401 unauthorized" in line)]
        assert refused, "the browser's cross-site post reached the agent and was refused (logged at WARNING)"

        form_ = {"role_id": "st1", "roi_id": "tire", "threshold": "0.5"}
        cross = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        r = c.post("/ui/threshold", data=form_, headers=cross)
        assert (r.status_code, error_of(r)) == (403, "cross_site")
        r = c.post("/label", data={"request_id": "part-2", "label": "ng"}, headers=cross)
        assert (r.status_code, error_of(r)) == (403, "cross_site")
        same = {"Origin": agent.http, "Sec-Fetch-Site": "same-origin"}
        c.cookies.clear()
        r = c.post("/ui/threshold", data=form_, headers=same)  # same origin, but no token: not the page's form
        assert (r.status_code, error_of(r)) == (403, "csrf")
        c.cookies.set("aa_csrf", token)
        r = c.post("/ui/threshold", data={**form_, "threshold": "1e308", "csrf": token}, headers=same)
        assert (r.status_code, error_of(r)) == (422, "invalid_threshold") and "calibration scores" in r.text
        assert c.get("/models/st1/tire").json()["threshold"] == before


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/index.html", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
