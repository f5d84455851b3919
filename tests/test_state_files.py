"""No state file under the data root may stop a start or another ROI (issue 23): each is parsed by its
schema (core/roi/state_files.py); a ROI whose files cannot be used is reported (/health degraded, /models,
the page, the CLI) and rebuilt from its samples where they are intact, while every other ROI is served."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.roi.state_files import StateFileError, check_drift, check_manifest, check_pending, check_sample
from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker, free_port
from tests.conftest import AGENT_ENV_KEYS

V1 = Path(__file__).parent / "fixtures" / "data_root_v1" / "data" / "models" / "st1" / "synthetic"


def _v1() -> dict:
    return json.loads((V1 / "manifest.json").read_text())


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("threshold"),
    lambda m: m["threshold"].pop("method"),
    lambda m: m.update(version="abc"),
    lambda m: m["threshold"].update(value=math.nan),
    lambda m: m["threshold"].update(value=-1.0),
    lambda m: m["counts"].update(ok="12"),
    lambda m: m.update(role_id="../other"),
    lambda m: m.update(ok_scores=[0.1, "x"]),
    lambda m: m.update(branch_scales=[{"mean": 0.1, "std": 0.0}]),
    lambda m: m.update(policy_override={"policy": "auto", "ok_percentile": 1e9}),
    lambda m: m.update(ng_rank={"form": "linear_head", "active": [0, 1], "ng_samples": 9}),
    lambda m: m.update(ng_rank={"form": "linear_head", "active": [0], "ng_samples": 9,
                                "scales": [{"mean": 0.1, "std": 0.1}], "spread": -1.0}),
    lambda m: m.update(ng_rank={"form": "pickle", "active": [0], "ng_samples": 9}),
    lambda m: m.update(ng_rank={"form": None, "active": [0], "ng_samples": 9, "cv_auroc_gain": {"x": {"y": 1}}}),
], ids=["no-threshold", "threshold-without-method", "version-abc", "threshold-nan", "negative-threshold",
        "count-as-string", "path-like-id", "string-score", "zero-std", "percentile-out-of-range",
        "ng-form-without-scales", "ng-negative-spread", "ng-unknown-form", "ng-gains-not-figures"])
def test_a_manifest_that_is_not_ours_is_refused_by_its_schema(edit) -> None:
    m = _v1()
    check_manifest(m)  # the v1 manifest (written before the schema existed) is valid
    check_manifest({**m, "ng_rank": {"form": None, "active": [0, 1], "ng_samples": 3, "reason": "fewer than 5"}})
    edit(m)
    with pytest.raises(StateFileError) as err:
        check_manifest(m)
    assert err.value.code == "invalid_state_file" and "manifest.json is not valid" in err.value.message


def test_pending_drift_and_sample_files_are_checked() -> None:
    check_pending({"op": "delete", "ids": {"ok": ["a1"]}, "reason": "x", "change": "delete", "mask": False})
    for bad in ({"op": "delete", "ids": {"ok": ["../../st1/tire/x"]}}, {"op": "delete", "ids": "a1"},
                {"op": "rollback", "to": "3", "new_version": 4}, {"op": "format_disk"}):
        with pytest.raises(StateFileError):
            check_pending(bad)
    check_drift({"state": "ok", "recent": [[0.1, False]], "older": [True], "last": None})
    with pytest.raises(StateFileError):
        check_drift({"state": "ok", "last": {"state": "ok", "predictions": "many", "enough_data": True}})
    sample = json.loads(next(V1.glob("samples/ok/*.json")).read_text())
    check_sample(sample)
    for key, value in (("image_file", "../../manifest.json"), ("sha256", "zz"), ("mm_per_px", math.inf)):
        with pytest.raises(StateFileError):
            check_sample({**sample, key: value})


def _copy_roi(root: Path, name: str) -> Path:
    dst = root / "models" / "st1" / name
    shutil.copytree(root / "models" / "st1" / "tire", dst)
    for path in dst.rglob("*.json"):  # the copy's own ids, as the agent would have written them
        text = path.read_text()
        path.write_text(text.replace('"roi_id": "tire"', f'"roi_id": "{name}"'))
    return dst


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def test_corrupt_state_files_leave_the_agent_serving_and_report_the_roi(tmp_path: Path, data_root: Path,
                                                                       tire: Path, broker: Broker) -> None:
    # 1. a manifest without threshold, samples intact: reported, then rebuilt from the samples
    _edit_json(_copy_roi(data_root, "nothreshold") / "manifest.json", lambda m: m.pop("threshold"))
    # 2. version "abc" and no samples left: reported; it cannot be rebuilt
    lost = _copy_roi(data_root, "nosamples")
    _edit_json(lost / "manifest.json", lambda m: m.update(version="abc"))
    shutil.rmtree(lost / "samples")
    # 3. a pending.json with wrong types and a path-like id pointing into another ROI
    pend = _copy_roi(data_root, "pending")
    (pend / "pending.json").write_text(json.dumps({"op": "delete", "ids": {"ok": ["../../tire/samples/ok/x"]},
                                                   "reason": 5, "mask": "yes"}))
    # 4. a drift.json with a string where a number belongs
    drift = _copy_roi(data_root, "drift")
    (drift / "drift.json").write_text(json.dumps({"state": "ok", "recent": [["high", False]], "last": {
        "state": "warning", "predictions": "many", "enough_data": True}}))
    # 5. a NaN threshold (valid JSON for Python's parser)
    _edit_json(_copy_roi(data_root, "nan") / "manifest.json", lambda m: m["threshold"].update(value=math.nan))
    # 6. an index valid by its schema but of another feature width: the load itself fails (roi_unloadable)
    def halve(m: dict) -> None:
        m.update(dim=m["dim"] // 2, rows=m["rows"] * 2)
        for e in m["entries"]:
            e.update(offset=e["offset"] * 2, count=e["count"] * 2)

    _edit_json(_copy_roi(data_root, "broken") / "index" / "ok.json", halve)
    before_tire = sorted(p.name for p in (data_root / "models/st1/tire").rglob("*"))

    env = {**os.environ, **AGENT_ENV_KEYS}
    cli = subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(data_root), "models"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr  # was: exit 1 with KeyError 'threshold'
    listed = {json.loads(line)["roi_id"]: json.loads(line) for line in cli.stdout.splitlines()}
    assert "unloadable" in listed["nothreshold"] and "threshold" in listed["nothreshold"]["unloadable"]["reason"]
    assert "rebuilt" in listed["nothreshold"]["unloadable"]["then"]
    assert "unloadable" in listed["nosamples"] and "version" in listed["nosamples"]["unloadable"]["reason"]
    assert listed["tire"]["threshold"] > 0 and "unloadable" not in listed["drift"]

    port = free_port()
    agent = Agent(data_root, broker.port, http_port=port).start()
    watcher = Observer(broker.port)
    try:
        with httpx.Client(base_url=agent.http, timeout=120) as c:
            health = c.get("/health").json()
            assert health["status"] == "degraded", health
            assert any("st1/nothreshold" in p for p in health["problems"]), health["problems"]
            models = {s["roi_id"]: s for s in c.get("/models").json()}
            assert "unloadable" in models["nan"] and "unloadable" in models["nosamples"]
            assert models["drift"]["threshold"] > 0
            page = c.get("/")
            assert page.status_code == 200 and "ROIs that cannot be used" in page.text and "st1/nosamples" in page.text
            image = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[0].read_bytes()

            def predict(roi: str) -> httpx.Response:
                return c.post("/predict", data={"role_id": "st1", "roi_id": roi},
                              files=[("file", ("p.png", image, "image/png"))])

            assert predict("tire").status_code == 200  # the other ROIs are served throughout
            for roi in ("nothreshold", "nan", "pending", "drift"):  # intact samples: rebuilt, then served
                r = predict(roi)
                assert r.status_code == 200, (roi, r.text)
                assert r.json()["score"] > 0
            state = c.get("/models/st1/nothreshold").json()
            assert state["recovered"]["reason"].startswith("manifest.json is not valid"), state
            assert (data_root / "models/st1/nothreshold" / state["recovered"]["quarantined"]).is_file()
            r = predict("nosamples")  # nothing to rebuild from: a fresh, unfitted ROI, said so
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_fitted"
            r = predict("broken")  # files that pass their schemas but cannot make a model: refused, said why
            assert r.status_code == 503 and r.json()["error"]["code"] == "roi_unloadable", r.text
            assert "cannot be loaded" in r.json()["error"]["message"]
            assert predict("broken").json()["error"]["code"] == "roi_unloadable"  # again: tried, not logged again
            assert predict("tire").status_code == 200
            assert "unloadable" in c.get("/models/st1/broken").json()
            health = c.get("/health").json()
            assert health["status"] == "degraded" and any("st1/broken" in p for p in health["problems"])
            assert not any("nothreshold" in p for p in health["problems"])  # rebuilt: no longer reported
            assert "st1/broken" in c.get("/").text
            states = wait_for(lambda: [json.loads(p) for t, p, _, _ in list(watcher.messages)
                                       if t.endswith("st1/broken/state")], 20, "the state topic of st1/broken")
            assert "cannot be loaded" not in states[-1]["unloadable"]["reason"]  # the reason itself, not our words
            assert "RuntimeError" in states[-1]["unloadable"]["reason"]
            nosamples = [json.loads(p) for t, p, _, _ in list(watcher.messages) if t.endswith("st1/nosamples/state")]
            assert nosamples and "unloadable" in nosamples[0]  # said on the state topic at start
        assert agent.sigterm() == 0
    finally:
        watcher.close()
        agent.cleanup()
    pend_q = list((data_root / "models/st1/pending/quarantine/files").glob("pending.json-*"))
    assert len(pend_q) == 2 and not (data_root / "models/st1/pending/pending.json").exists()  # file + reason
    after_tire = sorted(p.name for p in (data_root / "models/st1/tire").rglob("*"))
    assert not [n for n in after_tire if n.endswith(".reason.json") or n == "quarantine"]  # nothing written there
    assert set(before_tire) <= set(after_tire)  # and nothing of it moved or trashed
    log = agent.log.read_text()
    assert "ROI st1/nothreshold: manifest.json is not valid" in log
    assert log.count("ERROR agent.runtime: ROI st1/broken cannot be loaded") == 1  # once, with its traceback
