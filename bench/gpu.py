"""Every figure of the speed issue in one run, for the lent GPU (one device call of a few minutes) or a CPU.

    python3 bench/gpu.py --out DIR [--device cuda|cpu] [--images DIR] [--weights FILE] [--quick]

`--images`: a folder with a few real OK PNGs (default: MVTec 3D-AD tire from ../shared); `--weights`: the
EfficientNet-Lite0 weights (default: the installed package's). Medians after warm-up; JSON to
DIR/gpu.json, a table last on stdout. Measured (EfficientNet-Lite0 at 320, a bank from the images):

- core, 512x512 PNG: bare forward b1 and b8 (per image), e2e b1 (bytes -> result), predict b8 per image;
- core, 2048x1536 and 1920x1080 JPEG (real images upscaled): e2e b1 without / with heatmap, its decode;
- daemon (`anomaly-agent run` with HTTP and the folder on this device): HTTP round trip of one 2048x1536
  JPEG, HTTP burst (8 clients) and folder burst (all files dropped at once) in images/s against the
  core's batched predict; MQTT too when a `mosquitto` binary exists (the GPU machine has none).

Targets (issue "Speed on the original backend's own load"): GPU e2e 2-3 MP <= 10 ms, with heatmap <= 15 ms;
512² e2e <= 2x forward; batched predict per image <= 2x batched forward per image; each ingress >= 60 % of
the core's batched throughput; HTTP round trip of a 2-3 MP JPEG <= 15 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import timing  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.roi.model import RoiModel  # noqa: E402


def median_ms(fn, runs: int) -> float:
    return timing.median_ms(fn, runs, warmup=3, digits=3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def encode(img: np.ndarray, size: tuple[int, int], fmt: str) -> bytes:
    big = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(fmt, big, [cv2.IMWRITE_JPEG_QUALITY, 92] if fmt == ".jpg" else [])[1].tobytes()


def core_figures(model: RoiModel, pngs: list[bytes], jpegs: dict[str, list[bytes]], runs: int) -> dict:
    ex = model.extractor
    dev = ex.device
    draft = ex.input_size
    one = decode_image(pngs[0])
    batch1 = ex.preprocess([one.rgb])
    batch8 = ex.preprocess([one.rgb] * 8)

    def fwd(b: torch.Tensor) -> None:
        with torch.inference_mode():
            ex.forward_branches(b)
        sync(dev)

    out: dict = {"forward_b1_ms": median_ms(lambda: fwd(batch1), runs),
                 "forward_b8_per_image_ms": round(median_ms(lambda: fwd(batch8), runs) / 8, 3)}
    i = iter(range(1 << 30))
    out["e2e_512_b1_ms"] = median_ms(lambda: model.predict([decode_image(pngs[next(i) % len(pngs)])]), runs)
    out["e2e_512_heatmap_ms"] = median_ms(lambda: model.predict([decode_image(pngs[0])], heatmap=True), runs)
    eight = pngs[:8] if len(pngs) >= 8 else (pngs * 8)[:8]
    out["predict_b8_per_image_ms"] = round(median_ms(
        lambda: model.predict([decode_image(d) for d in eight]), max(3, runs // 4)) / 8, 3)
    out["core_batched_images_per_s"] = round(1000 / out["predict_b8_per_image_ms"], 1)
    for name, datas in jpegs.items():
        out.update(jpeg_figures(model, name, datas, runs))
    p = model.predict([decode_image(jpegs["2048x1536"][0], draft_for=draft)])[0]
    out["jpeg_2048x1536_parts_ms"] = {k: round(v, 3) for k, v in p.timings_ms.items()}
    return out


def jpeg_figures(model: RoiModel, name: str, datas: list[bytes], runs: int) -> dict:
    """One JPEG size: its decode (DCT-scaled to the backbone input), e2e without and with heatmap."""
    draft = model.extractor.input_size
    k = iter(range(1 << 30))

    def decoded() -> object:
        return decode_image(datas[next(k) % len(datas)], draft_for=draft)

    return {f"jpeg_{name}_decode_ms": median_ms(decoded, runs),
            f"jpeg_{name}_e2e_ms": median_ms(lambda: model.predict([decoded()]), runs),
            f"jpeg_{name}_heatmap_ms": median_ms(lambda: model.predict([decoded()], heatmap=True), runs)}


def daemon_figures(data_root: Path, jpeg: list[bytes], pngs: list[bytes], n: int, device: str,
                   weights: str | None) -> dict:
    import httpx

    from tests.agent_proc import Agent, Observer, wait_for
    from tests.broker import Broker, free_port

    env = {"ANOMALY_AGENT_DEVICE": device, "ANOMALY_AGENT_BACKBONE__RESOLUTION": "320",
           "ANOMALY_AGENT_FOLDER__STABLE_S": "0", "ANOMALY_AGENT_WORKER__QUEUE_SIZE": str(max(64, n + 8)),
           "ANOMALY_AGENT_HTTP__RECENT_RESULTS": "0", "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "4096"}
    if weights:
        env["ANOMALY_AGENT_BACKBONE__WEIGHTS"] = weights
    broker = None
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        broker = Broker(data_root.parent / "broker")
        broker.start()
    port = free_port()
    agent = Agent(data_root, broker.port if broker else None, env=env, http_port=port).start()
    out: dict = {}
    try:
        with httpx.Client(base_url=agent.http, timeout=300) as c:
            def post(data: bytes) -> httpx.Response:
                return c.post("/predict", data={"role_id": "bench", "roi_id": "roi"},
                              files={"file": ("p.jpg", data, "image/jpeg")})
            out["http_round_trip_2048x1536_ms"] = median_ms(lambda: post(jpeg[0]), 20)
            with ThreadPoolExecutor(8) as pool:
                t0 = time.perf_counter()
                codes = list(pool.map(lambda k: post(pngs[k % len(pngs)]).status_code, range(n)))
                out["http_burst_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
            out["http_burst_ok"] = codes.count(200)
        inbox = data_root / "inbox" / "bench" / "roi" / "predict"
        inbox.mkdir(parents=True, exist_ok=True)
        results = data_root / "results" / "bench" / "roi"
        t0 = time.perf_counter()
        for k in range(n):
            tmp = inbox.parent / f".f{k}.png"
            tmp.write_bytes(pngs[k % len(pngs)])
            os.replace(tmp, inbox / f"f{k}.png")
        wait_for(lambda: results.exists() and len(list(results.glob("f*.json"))) >= n, 600, "folder results")
        out["folder_burst_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
        if broker is not None:
            import base64
            obs = Observer(broker.port)
            t0 = time.perf_counter()
            for k in range(n):
                obs.publish("anomaly/bench/roi/predict", json.dumps({
                    "request_id": f"m{k}", "image_b64": base64.b64encode(pngs[k % len(pngs)]).decode()}))
            wait_for(lambda: len(obs.results()) >= n, 600, "MQTT results")
            out["mqtt_burst_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
            obs.close()
        else:
            out["mqtt_burst_images_per_s"] = "no mosquitto on this machine"
    finally:
        agent.sigterm()
        if broker is not None:
            broker.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer runs and files (a CPU trial)")
    ap.add_argument("--no-daemon", action="store_true")
    args = ap.parse_args()
    folder = args.images or Path(os.environ.get("ANOMALY_SHARED_DIR", ROOT.parent / "shared")) / \
        "datasets" / "mvtec_3d_ad" / "tire" / "train" / "good" / "rgb"
    paths = sorted(folder.glob("*.png"))[:20]
    real = [cv2.imread(str(p)) for p in paths]
    pngs = [encode(im, (512, 512), ".png") for im in real]
    jpegs = {"2048x1536": [encode(im, (2048, 1536), ".jpg") for im in real[:8]],
             "1920x1080": [encode(im, (1920, 1080), ".jpg") for im in real[:8]]}
    ex = get_extractor("efficientnet_lite0", args.weights, 320, args.device)
    runs = 10 if args.quick else 50
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "data"
        model = RoiModel(data_root, "bench", "roi", ex)
        model.fit_ok([(d, decode_image(d), {"source": "bench"}) for d in pngs])
        result = {"device": str(ex.device), "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name(0) if ex.device.type == "cuda" else None,
                  "bank": len(model.branches[0].bank), "core": core_figures(model, pngs, jpegs, runs)}
        if not args.no_daemon:
            result["daemon"] = daemon_figures(data_root, jpegs["2048x1536"], pngs, 50 if args.quick else 500,
                                              args.device, args.weights)
    c, d = result["core"], result.get("daemon", {})
    checks = {
        "e2e 2048x1536 JPEG <= 10 ms": (c["jpeg_2048x1536_e2e_ms"], c["jpeg_2048x1536_e2e_ms"] <= 10),
        "with heatmap <= 15 ms": (c["jpeg_2048x1536_heatmap_ms"], c["jpeg_2048x1536_heatmap_ms"] <= 15),
        "512 e2e / forward <= 2": (round(c["e2e_512_b1_ms"] / c["forward_b1_ms"], 2),
                                   c["e2e_512_b1_ms"] <= 2 * c["forward_b1_ms"]),
        "b8 predict / forward per image <= 2": (
            round(c["predict_b8_per_image_ms"] / c["forward_b8_per_image_ms"], 2),
            c["predict_b8_per_image_ms"] <= 2 * c["forward_b8_per_image_ms"])}
    for key in ("http_burst_images_per_s", "folder_burst_images_per_s", "mqtt_burst_images_per_s"):
        if isinstance(d.get(key), float):
            share = d[key] / c["core_batched_images_per_s"]
            checks[f"{key.split('_')[0]} >= 60 % of core batched"] = (round(share, 2), share >= 0.6)
    if "http_round_trip_2048x1536_ms" in d:
        checks["HTTP round trip 2048x1536 <= 15 ms"] = (d["http_round_trip_2048x1536_ms"],
                                                        d["http_round_trip_2048x1536_ms"] <= 15)
    result["targets"] = {k: {"value": v, "met": bool(m)} for k, (v, m) in checks.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    for k, (v, m) in checks.items():
        print(f"{'MET ' if m else 'MISS'} {k}: {v}")


if __name__ == "__main__":
    main()
