"""Daemon overhead and batching: MQTT and folder round trips vs the bare core predict.

    .venv/bin/python bench/throughput.py > bench/out/throughput.json

Starts a private Mosquitto and `anomaly-agent run` (shipped config, EfficientNet-Lite0 at its
default resolution, a ROI fitted on 20 real tire images), then measures on the same real images:
- core: decode + RoiModel.predict in-process, one image at a time (p50 / p95 ms);
- mqtt_serial / folder_serial: one request at a time, submit -> result received (p50 / p95 ms);
- mqtt_burst: N requests published at once, requests per second, with worker.max_batch 8 and 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from datasets import shared_root  # noqa: E402

from tests.agent_proc import STARTED, Agent, Observer, wait_for  # noqa: E402
from tests.broker import Broker  # noqa: E402

ENV = {"ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0", "ANOMALY_AGENT_BACKBONE__RESOLUTION": "320",
       "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "4096"}


def pct(values: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(values, 50)), 1), "p95_ms": round(float(np.percentile(values, 95)), 1),
            "n": len(values)}


def core_latency(root: Path, images: list[bytes], runs: int) -> dict:
    from core.backbones import get_extractor
    from core.image_io import decode_image
    from core.model import ModelSettings, RoiModel

    ex = get_extractor("efficientnet_lite0", resolution=320, device="cpu")
    model = RoiModel(root, "st1", "tire", ex, ModelSettings())
    times = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        model.predict([decode_image(images[i % len(images)])])
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return pct(times)


def mqtt_serial(obs: Observer, images: list[bytes], runs: int, tag: str) -> dict:
    times = []
    for i in range(runs + 3):
        rid = f"{tag}{i}"
        t0 = time.perf_counter()
        obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": rid, "image_b64": base64.b64encode(
            images[i % len(images)]).decode()}))
        obs.wait_result(rid, 60)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return pct(times)


def mqtt_burst(obs: Observer, images: list[bytes], n: int, tag: str) -> dict:
    payloads = [json.dumps({"request_id": f"{tag}{i}", "image_b64": base64.b64encode(images[i % len(images)])
                            .decode()}) for i in range(n)]
    t0 = time.perf_counter()
    for p in payloads:
        obs.client.publish("anomaly/st1/tire/predict", p, qos=1)
    wait_for(lambda: sum(r["request_id"].startswith(tag) for r in obs.results()) >= n, 600, tag)
    dt = time.perf_counter() - t0
    batches = [r["data"]["batch_size"] for r in obs.results() if r["request_id"].startswith(tag)]
    return {"requests": n, "seconds": round(dt, 2), "rps": round(n / dt, 2),
            "mean_batch": round(statistics.mean(batches), 2)}


def folder_serial(root: Path, images: list[bytes], runs: int) -> dict:
    inbox = root / "inbox" / "st1" / "tire" / "predict"
    inbox.mkdir(parents=True, exist_ok=True)
    results = root / "results" / "st1" / "tire"
    times = []
    for i in range(runs + 3):
        tmp = inbox / f".s{i}.png.part"
        tmp.write_bytes(images[i % len(images)])
        t0 = time.perf_counter()
        os.rename(tmp, inbox / f"s{i}.png")
        deadline = time.monotonic() + 60
        while not (results / f"s{i}.json").exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return pct(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--burst", type=int, default=48)
    args = ap.parse_args()
    tire = shared_root() / "datasets" / "mvtec_3d_ad" / "tire"
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:20]
    images = [p.read_bytes() for p in sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:10]]
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        template = tmp / "template"
        subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(template), "--log-level", "WARNING",
                        "fit", "--role", "st1", "--roi", "tire", "--quiet", *map(str, train)],
                       env={**os.environ, **ENV}, check=True, capture_output=True)
        out["core"] = core_latency(template, images, args.runs)
        broker = Broker(tmp / "broker")
        broker.start()
        try:
            for max_batch in (8, 1):
                root = tmp / f"data{max_batch}"
                shutil.copytree(template, root)
                (root / "inbox" / "st1" / "tire" / "predict").mkdir(parents=True)  # as a station would
                agent = Agent(root, broker.port, env={**ENV, "ANOMALY_AGENT_WORKER__MAX_BATCH": str(max_batch)},
                              client_id=f"bench{max_batch}").start()
                obs = Observer(broker.port)
                if max_batch == 8:
                    out["mqtt_serial"] = mqtt_serial(obs, images, args.runs, "ser")
                    out["folder_serial"] = folder_serial(root, images, args.runs)
                out[f"mqtt_burst_max_batch_{max_batch}"] = mqtt_burst(obs, images, args.burst, f"b{max_batch}_")
                obs.close()
                agent.sigterm()
        finally:
            for agent in STARTED:  # never leave an agent running, also when a step failed
                agent.cleanup()
            broker.stop()
    c = out["core"]["p50_ms"]
    out["overhead_mqtt_p50"] = round(out["mqtt_serial"]["p50_ms"] / c - 1, 3)
    out["overhead_folder_p50"] = round(out["folder_serial"]["p50_ms"] / c - 1, 3)
    out["batching_speedup"] = round(out["mqtt_burst_max_batch_8"]["rps"] / out["mqtt_burst_max_batch_1"]["rps"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
