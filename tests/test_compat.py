"""Guards of the architecture: a data root written by an earlier version loads unchanged, and every
ingress (folder, MQTT, HTTP) and the CLI answer a prediction with the documented payload shape."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.backbones import get_extractor
from core.image_io import decode_image
from core.model import ModelSettings, RoiModel
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
    ex = get_extractor("efficientnet_lite0", resolution=expected["resolution"], device="cpu")
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


def shape(value: object) -> object:
    """The structure of a payload: keys in order, value types; lists by their first element."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_every_ingress_and_the_cli_answer_with_the_documented_payload(data_root: Path, tire: Path,
                                                                      broker: Broker) -> None:
    """The same training image (far under the threshold: no regions) with mm_per_px 0.1 and a heatmap
    asked for, through each way in; their shapes are pinned in tests/golden/predict_payloads.json (keys,
    their order and value types, as docs/protocol.md documents them)."""
    image = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[0].read_bytes()
    port = free_port()
    obs = Observer(broker.port)
    agent = Agent(data_root, broker.port, http_port=port).start()
    drop(data_root / "inbox" / "st1" / "tire" / "predict", "g.png", image, {"mm_per_px": 0.1, "heatmap": True,
                                                                              "request_id": "folder-1"})
    obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "mqtt-1", "mm_per_px": 0.1, "heatmap": True,
                                                        "image_b64": base64.b64encode(image).decode()}))
    with httpx.Client(base_url=agent.http, timeout=60) as c:
        http = c.post("/predict", data={"role_id": "st1", "roi_id": "tire", "mm_per_px": "0.1", "heatmap": "true",
                                        "request_id": "http-1"}, files={"file": ("g.png", image, "image/png")}).json()
    result_file = data_root / "results" / "st1" / "tire" / "g.json"
    wait_for(result_file.exists, 60, "folder result")
    mqtt_result = obs.wait_result("mqtt-1")
    assert agent.sigterm() == 0
    obs.close()
    probe = data_root.parent / "g.png"
    probe.write_bytes(image)
    env = {**os.environ, "ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0",
           "ANOMALY_AGENT_BACKBONE__RESOLUTION": "192", "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "1000"}
    cli = subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(data_root), "--log-level", "ERROR",
                          "predict", "--role", "st1", "--roi", "tire", "--mm-per-px", "0.1", "--heatmap", str(probe)],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    got = {"folder": shape(json.loads(result_file.read_text())), "mqtt": shape(mqtt_result), "http": shape(http),
           "cli": shape(json.loads(cli.stdout.splitlines()[0]))}
    assert not json.loads(result_file.read_text())["data"]["is_anomaly"]
    if os.environ.get("ANOMALY_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    # compared as text: the order of the keys is part of the contract, not only the keys
    assert json.dumps(got, indent=1) + "\n" == GOLDEN.read_text()
