"""Guards of the architecture: a data root written by an earlier version loads unchanged, and every
ingress (folder, MQTT, HTTP) and the CLI answer a prediction with the documented payload shape."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from core.backbones import get_extractor
from core.image_io import decode_image
from core.roi.model import ModelSettings, RoiModel
from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker, free_port
from tests.test_daemon import drop

FIXTURE = Path(__file__).parent / "fixtures" / "data_root_v1"
GOLDEN = Path(__file__).parent / "golden" / "predict_payloads.json"


def test_a_data_root_written_by_commit_907ae81_loads_unchanged(tmp_path: Path, caplog) -> None:
    """Samples, indexes, both banks and the manifest of a ROI fitted before the core split: read as they
    are (nothing re-indexed, re-selected or rewritten) and the probe scores as it did then."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    root = tmp_path / "data"
    shutil.copytree(FIXTURE / "data", root)
    roi = root / "models" / "st1" / "synthetic"
    before = {p.relative_to(roi): p.read_bytes() for p in roi.rglob("*") if p.is_file()}
    # the branches of that version's default (fine + coarse): the files are read as they are
    ex = get_extractor("efficientnet_lite0", resolution=expected["resolution"], device="cpu",
                       branches=((4, 10), (10, 14)))
    with caplog.at_level(logging.INFO):
        model = RoiModel(root, "st1", "synthetic", ex, ModelSettings(**expected["settings"]))
    assert not any(w in caplog.text for w in ("stale", "indexing", "selected", "rebuil")), caplog.text
    after = {p.relative_to(roi): p.read_bytes() for p in roi.rglob("*") if p.is_file()}
    assert {k: after.get(k) for k in before} == before  # not one file rewritten
    # only added: the snapshot of the loaded version, so that its first change can be rolled back
    assert {k.parts[:2] for k in set(after) - set(before)} == {("versions", f"{expected['model_version']:08d}")}
    pred = model.predict([decode_image((FIXTURE / "probe.png").read_bytes())])[0]
    assert pred.score == pytest.approx(expected["score"], abs=1e-5)
    assert pred.threshold == pytest.approx(expected["threshold"], abs=1e-6)
    assert model.version == expected["model_version"] and model.state()["bank_size"] == expected["bank_size"]


def test_a_data_root_written_before_the_third_branch_gets_it_from_its_samples(tmp_path: Path, caplog) -> None:
    """The same v1 ROI under today's default extractor (four branches): its fine and coarse banks are kept as
    they are, the new small-view branches are indexed from the stored samples by themselves (logged), and the ROI
    predicts with the shipped pair (3 OK samples: too few to tune) as before."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    root = tmp_path / "data"
    shutil.copytree(FIXTURE / "data", root)
    index = root / "models" / "st1" / "synthetic" / "index"
    banks = {p.name: p.read_bytes() for p in index.glob("*bank.npz")}
    ex = get_extractor("efficientnet_lite0", resolution=expected["resolution"], device="cpu")
    assert len(ex.branch_identities) == 4
    with caplog.at_level(logging.INFO):
        model = RoiModel(root, "st1", "synthetic", ex, ModelSettings(**expected["settings"]))
    assert "index" in caplog.text.lower(), caplog.text
    assert {p.name: p.read_bytes() for p in index.glob("*bank.npz") if p.name in banks} == banks
    assert len(model.branches) == 4 and model.state()["fusion"]["active"] == [0, 1]
    pred = model.predict([decode_image((FIXTURE / "probe.png").read_bytes())])[0]
    assert pred.score == pytest.approx(expected["score"], abs=1e-5)
    assert pred.is_anomaly == (expected["score"] > expected["threshold"])

def shape(value: object) -> object:
    """The structure of a payload: keys in order, value types; lists by their first element."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_every_ingress_and_the_cli_answer_with_the_documented_payload(data_root: Path, tire: Path,
                                                                      broker: Broker) -> None:
    """The same training image (far under the threshold: no regions), and the same image with a painted
    defect (an anomaly with regions), each with mm_per_px 0.1 and a heatmap asked for, through each way in;
    their shapes are pinned in tests/golden/predict_payloads.json (keys, their order and value types, as
    docs/protocol.md documents them)."""
    image = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[0].read_bytes()
    rgb = np.array(Image.open(io.BytesIO(image)).convert("RGB"))
    rgb[200:260, 150:230] = 0  # a dark hole and a bright scratch: far over any threshold
    rgb[320:326, 60:300] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    probes = {"": image, "_defect": buf.getvalue()}
    port = free_port()
    obs = Observer(broker.port)
    agent = Agent(data_root, broker.port, http_port=port).start()
    http, mqtt_result = {}, {}
    for tag, img in probes.items():
        drop(data_root / "inbox" / "st1" / "tire" / "predict", f"g{tag}.png", img,
             {"mm_per_px": 0.1, "heatmap": True, "request_id": f"folder{tag}"})
        obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": f"mqtt{tag}", "mm_per_px": 0.1,
                                                            "heatmap": True, "image_b64": base64.b64encode(img)
                                                            .decode()}))
        with httpx.Client(base_url=agent.http, timeout=60) as c:
            http[tag] = c.post("/predict", data={"role_id": "st1", "roi_id": "tire", "mm_per_px": "0.1",
                                                 "heatmap": "true", "request_id": f"http{tag}"},
                               files={"file": ("g.png", img, "image/png")}).json()
        mqtt_result[tag] = obs.wait_result(f"mqtt{tag}")
    results = {tag: data_root / "results" / "st1" / "tire" / f"g{tag}.json" for tag in probes}
    wait_for(lambda: all(r.exists() for r in results.values()), 60, "folder results")
    assert agent.sigterm() == 0
    obs.close()
    env = {**os.environ, "ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0",
           "ANOMALY_AGENT_BACKBONE__RESOLUTION": "192", "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "1000"}
    got = {}
    for tag, img in probes.items():
        probe = data_root.parent / f"g{tag}.png"
        probe.write_bytes(img)
        cli = subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(data_root), "--log-level",
                              "ERROR", "predict", "--role", "st1", "--roi", "tire", "--mm-per-px", "0.1", "--heatmap",
                              str(probe)], env=env, capture_output=True, text=True, timeout=300, check=True)
        folder = json.loads(results[tag].read_text())
        assert folder["data"]["is_anomaly"] == bool(tag) and bool(folder["data"]["defects"]["regions"]) == bool(tag)
        got |= {f"folder{tag}": shape(folder), f"mqtt{tag}": shape(mqtt_result[tag]), f"http{tag}": shape(http[tag]),
                f"cli{tag}": shape(json.loads(cli.stdout.splitlines()[0]))}
    if os.environ.get("ANOMALY_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    # compared as text: the order of the keys is part of the contract, not only the keys
    assert json.dumps(got, indent=1) + "\n" == GOLDEN.read_text()
