"""The `anomaly-agent` command line, run as a user would (subprocess, real files, real model)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.e2e  # every test here runs the CLI as a process

def run(args: list[str], cfg: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=timeout)


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    p = d / "agent.yaml"
    p.write_text("data_root: data\nlog_level: WARNING\nbackbone:\n  name: efficientnet_lite0\n  resolution: 192\n"
                 "defaults:\n  coreset_min: 1000\n")
    return p


@pytest.fixture(scope="module")
def fitted(cfg: Path, tire: Path) -> Path:
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:6]
    r = run(["fit", "--role", "st1", "--roi", "tire", "--mm-per-px", "0.2", *map(str, train)], cfg)
    assert r.returncode == 0, r.stderr
    summary = lines(r.stdout)[-1]
    assert summary["added"] == 6 and summary["samples"]["ok"] == 6 and summary["threshold"] > 0
    assert "fit st1/tire" in r.stderr  # the progress bar
    return cfg


def test_predict_lines_errors_and_exit_code(fitted: Path, tire: Path, tmp_path: Path) -> None:
    good = tire / "test" / "good" / "rgb" / "000.png"
    bad = tire / "test" / "hole" / "rgb" / "000.png"
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    hm = tmp_path / "heat"
    r = run(["predict", "--role", "st1", "--roi", "tire", "--mm-per-px", "0.2", "--heatmap", "--heatmap-dir",
             str(hm), str(good), str(junk), str(tmp_path / "missing.png"), str(bad)], fitted)
    assert r.returncode == 1, r.stderr
    out = lines(r.stdout)
    assert [o["file"] for o in out] == [str(good), str(junk), str(tmp_path / "missing.png"), str(bad)]
    assert out[1]["error"]["code"] == "unknown_format" and out[2]["error"]["code"] == "file_not_found"
    for o in (out[0], out[3]):
        for key in ("file", "is_anomaly", "score", "threshold", "inference_ms", "timings_ms", "mm_per_px", "defects"):
            assert key in o
        assert set(o["timings_ms"]) >= {"decode", "preprocess", "backbone", "knn", "postprocess"}
        assert o["mm_per_px"] == 0.2
        png = cv2.imdecode(np.frombuffer(base64.b64decode(o["heatmap_png_b64"]), np.uint8), cv2.IMREAD_COLOR)
        assert png.shape == (512, 384, 3) and Path(o["heatmap_file"]).is_file()
    assert out[0]["threshold"] == out[3]["threshold"] > 0


def test_calibrate_manual_threshold_and_models(fitted: Path, tire: Path) -> None:
    ng = sorted((tire / "test" / "hole" / "rgb").glob("*.png"))[:3]
    r = run(["calibrate", "--role", "st1", "--roi", "tire", *map(str, ng)], fitted)
    assert r.returncode == 0, r.stderr
    cal = lines(r.stdout)[-1]
    assert cal["samples"]["ng"] == 3 and cal["threshold_method"] == "ng_calibrated"
    r = run(["calibrate", "--role", "st1", "--roi", "tire", "--threshold", "0.75"], fitted)
    assert lines(r.stdout)[-1]["threshold"] == 0.75
    r = run(["models"], fitted)
    rows = lines(r.stdout)
    assert rows == [row for row in rows if row["role_id"] == "st1"] and rows[0]["threshold"] == 0.75
    assert rows[0]["backbone"]["name"] == "efficientnet_lite0" and rows[0]["samples"] == {"ok": 6, "ng": 3}
    r = run(["calibrate", "--role", "st1", "--roi", "tire", "--policy", "ok_only", "--ok-percentile", "100"], fitted)
    st = lines(r.stdout)[-1]
    assert r.returncode == 0 and st["threshold_method"] == "ok_percentile"
    assert st["threshold_policy"] == {"policy": "ok_only", "ok_percentile": 100.0, "ng_margin": 0.5,
                                      "ng_recall": None, "max_false_reject": 0.05, "source": "calibrate"}
    r = run(["calibrate", "--role", "st1", "--roi", "tire", "--reset"], fitted)
    assert lines(r.stdout)[-1]["threshold_method"] == "ng_calibrated"


def test_usage_errors_have_clear_exit_codes(fitted: Path, tire: Path, tmp_path: Path) -> None:
    img = str(tire / "test" / "good" / "rgb" / "000.png")
    r = run(["predict", "--role", "../etc", "--roi", "x", img], fitted)
    assert r.returncode == 2 and "invalid_id" in r.stderr and "role_id" in r.stderr
    r = run(["predict", "--role", "st1", "--roi", "never_fitted", img], fitted)
    assert r.returncode == 3 and "fit_ok" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  prot: 1\n")
    r = run(["models"], bad)
    assert r.returncode == 2 and "mqtt.prot: unknown key" in r.stderr
