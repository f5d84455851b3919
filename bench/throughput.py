"""Daemon overhead and batching: HTTP, MQTT and folder round trips vs the bare core predict.

    .venv/bin/python bench/throughput.py > bench/out/throughput.json

Starts a private Mosquitto and `anomaly-agent run` (shipped config, EfficientNet-Lite0 at its
default resolution, a ROI fitted on 20 real tire images), then measures on the same real images:
- core: decode + RoiModel.predict in-process, one image at a time (p50 / p95 ms);
- http_serial / mqtt_serial / folder_serial: one request at a time, submit -> result received
  (p50 / p95 ms), in blocks that take turns with the core's (see `alternating`);
- mqtt_burst / http_burst: N requests at once (HTTP: 8 client threads), requests per second, with
  worker.max_batch auto (1 on a CPU) and 8.
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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer as WatchdogObserver

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from datasets import shared_root  # noqa: E402

from tests.agent_proc import STARTED, Agent, Observer, wait_for  # noqa: E402
from tests.broker import Broker, free_port  # noqa: E402

ENV = {"ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0", "ANOMALY_AGENT_BACKBONE__RESOLUTION": "320",
       "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "4096"}


def pct(values: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(values, 50)), 1), "p95_ms": round(float(np.percentile(values, 95)), 1),
            "n": len(values)}


class Core:
    """decode + RoiModel.predict in a process of its own, as the agent's worker is: the reference every
    ingress is compared with. This process keeps no PyTorch threads of its own that could spin next to
    the agent's forward (measured: a third slower when the core ran in the benchmark's process)."""

    def __init__(self, root: Path, images: list[Path]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--core-server", str(root), *map(str, images)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

        self.stages: list[dict] = []  # timings_ms of each prediction (decode, preprocess, backbone, ...)

    def block(self, start: int, n: int, gap_s: float) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{start} {n} {gap_s}\n")
        self.proc.stdin.flush()
        times, stages = json.loads(self.proc.stdout.readline())
        self.stages += stages[1:]  # the block's first request is a warm-up, as in `alternating`
        return times

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def core_server(root: Path, paths: list[str]) -> None:
    """`--core-server`: read 'start n gap' lines, predict n images, print their times (ms) as JSON."""
    from core.backbones import get_extractor
    from core.image_io import decode_image
    from core.roi.model import ModelSettings, RoiModel

    ex = get_extractor("efficientnet_lite0", resolution=320, device="cpu")
    model = RoiModel(root, "st1", "tire", ex, ModelSettings())
    images = [Path(p).read_bytes() for p in paths]
    print("ready", flush=True)
    for line in sys.stdin:
        start, n, gap = line.split()
        times, stages = [], []
        for i in range(int(start), int(start) + int(n)):
            time.sleep(float(gap))
            t0 = time.perf_counter()
            img = decode_image(images[i % len(images)], draft_for=ex.input_size)  # as the agent
            t1 = time.perf_counter()
            pred = model.predict([img])[0]
            times.append((time.perf_counter() - t0) * 1000)
            stages.append({"decode": (t1 - t0) * 1000, **pred.timings_ms})
        print(json.dumps([times, stages]), flush=True)


def stage_p50(rows: list[dict], key: str) -> float:
    return round(float(np.median([r[key] for r in rows])), 2)


def mqtt_one(obs: Observer, agent_ms: list[dict]) -> Callable[[bytes, int], None]:
    """One predict over MQTT (publish, then wait for the result); agent_ms as in http_one. The payloads are
    built once per image, as a station holds its encoded image."""
    bodies: dict[int, str] = {}

    def run(image: bytes, i: int) -> None:
        rid = f"ser{i}"
        if id(image) not in bodies:
            bodies[id(image)] = json.dumps({"request_id": "RID", "image_b64": base64.b64encode(image).decode()})
        obs.publish("anomaly/st1/tire/predict", bodies[id(image)].replace('"RID"', f'"{rid}"', 1))
        d = obs.wait_result(rid, 60)["data"]
        agent_ms.append({**d["timings_ms"], "inference": d["inference_ms"], "queue": d["queue_ms"]})
    return run


def http_one(client: httpx.Client, agent_ms: list[dict]) -> Callable[[bytes, int], None]:
    """One predict over HTTP; agent_ms collects the agent's own timings_ms, with inference_ms and queue_ms.

    The multipart body of each image is built once, as a station holds its encoded image, so the
    figure is the agent's HTTP cost, not the client library's encoding."""
    bodies: dict[int, tuple[bytes, dict]] = {}

    def run(image: bytes, i: int) -> None:
        if id(image) not in bodies:
            req = client.build_request("POST", "/predict", data={"role_id": "st1", "roi_id": "tire"},
                                       files={"file": ("img.png", image, "image/png")})
            bodies[id(image)] = (req.read(), {"content-type": req.headers["content-type"]})
        body, headers = bodies[id(image)]
        r = client.post("/predict", content=body, headers=headers)
        r.raise_for_status()
        d = r.json()
        agent_ms.append({**d["timings_ms"], "inference": d["inference_ms"], "queue": d["queue_ms"]})
    return run


def folder_one(root: Path, agent_ms: list[dict]) -> Callable[[bytes, int], None]:
    """One predict through the folder (rename into the inbox, then wait for the result file); agent_ms as in
    http_one, read from the result file (after the clock stopped: the block times the round trip).

    The wait is on inotify (watchdog), as a station's own watcher would: polling every 2 ms from this process
    slowed the agent's forward on the two cores (its folder predictions computed 15 % slower than its HTTP
    ones in the same run)."""
    inbox = root / "inbox" / "st1" / "tire" / "predict"
    inbox.mkdir(parents=True, exist_ok=True)
    results = root / "results" / "st1" / "tire"
    results.mkdir(parents=True, exist_ok=True)
    arrived = threading.Condition()
    names: set[str] = set()

    class Arrivals(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            path = getattr(event, "dest_path", "") or event.src_path
            with arrived:
                names.add(Path(os.fsdecode(path)).name)
                arrived.notify_all()

    watcher = WatchdogObserver()
    watcher.schedule(Arrivals(), str(results))
    watcher.daemon = True
    watcher.start()

    def run(image: bytes, i: int) -> None:
        tmp = inbox / f".s{i}.png.part"
        tmp.write_bytes(image)
        os.rename(tmp, inbox / f"s{i}.png")
        with arrived:
            arrived.wait_for(lambda: f"s{i}.json" in names or (results / f"s{i}.json").exists(), 60)
        pending.append(results / f"s{i}.json")

    pending: list[Path] = []

    def collect() -> None:
        for path in pending:
            d = json.loads(path.read_text())["data"]
            agent_ms.append({**d["timings_ms"], "inference": d["inference_ms"], "queue": d["queue_ms"]})
        pending.clear()
    run.collect = collect  # type: ignore[attr-defined]
    return run


Block = Callable[[int, int, float], list[float]]


def timed(run: Callable[[bytes, int], None], images: list[bytes]) -> Block:
    """A block of requests, one at a time, each after `gap_s`: their round-trip times (ms)."""
    def block(start: int, n: int, gap_s: float) -> list[float]:
        times = []
        for i in range(start, start + n):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            run(images[i % len(images)], i)
            times.append((time.perf_counter() - t0) * 1000)
        return times
    return block


def alternating(paths: dict[str, Block], runs: int, blocks: int = 4, gap_s: float = 0.02) -> dict:
    """Blocks of requests per path, the paths taking turns (ABCD ABCD ...), so that slow phases of a
    shared machine hit all of them alike. Each block's first request is a warm-up; `gap_s` before
    every request is a camera's pause between parts, the same for all paths."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    per_block = max(1, -(-runs // blocks))
    i = 0
    for _ in range(blocks):
        for name, block in paths.items():
            times[name] += block(i, per_block + 1, gap_s)[1:]
            i += per_block + 1
    return {name: pct(t) for name, t in times.items()}


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


def http_burst(client: httpx.Client, images: list[bytes], n: int, concurrency: int = 8) -> dict:
    """n predicts from `concurrency` client threads at once (the queue holds them; none refused)."""
    def one(i: int) -> int:
        return client.post("/predict", data={"role_id": "st1", "roi_id": "tire"},
                           files={"file": ("img.png", images[i % len(images)], "image/png")}).status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(one, range(n)))
    dt = time.perf_counter() - t0
    return {"requests": n, "ok": codes.count(200), "seconds": round(dt, 2), "rps": round(n / dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--burst", type=int, default=48)
    ap.add_argument("--jpeg", default=None, metavar="WxH",
                    help="send the test images as JPEGs of this size (e.g. 2048x1536, the original load)")
    ap.add_argument("--core-server", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.core_server:
        return core_server(Path(args.core_server[0]), args.core_server[1:])
    tire = shared_root() / "datasets" / "mvtec_3d_ad" / "tire"
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:20]
    image_paths = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:10]
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.jpeg:  # the original backend's load: 2-3 MP JPEG ROIs (real images, upscaled)
            size = tuple(int(v) for v in args.jpeg.lower().split("x"))
            out["images"] = f"{args.jpeg} JPEG"
            jpegs = []
            for p in image_paths:
                big = cv2.resize(cv2.imread(str(p)), size, interpolation=cv2.INTER_CUBIC)
                jpegs.append(tmp / f"{p.stem}.jpg")
                jpegs[-1].write_bytes(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
            image_paths = jpegs
        images = [p.read_bytes() for p in image_paths]
        template = tmp / "template"
        subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(template), "--log-level", "WARNING",
                        "fit", "--role", "st1", "--roi", "tire", "--quiet", *map(str, train)],
                       env={**os.environ, **ENV}, check=True, capture_output=True)
        core = Core(template, image_paths)
        broker = Broker(tmp / "broker")
        broker.start()
        try:
            for max_batch in ("auto", 8):  # auto: the shipped default, 1 on a CPU
                root = tmp / f"data{max_batch}"
                shutil.copytree(template, root)
                (root / "inbox" / "st1" / "tire" / "predict").mkdir(parents=True)  # as a station would
                port = free_port()
                agent = Agent(root, broker.port, env={**ENV, "ANOMALY_AGENT_WORKER__MAX_BATCH": str(max_batch)},
                              client_id=f"bench{max_batch}", http_port=port).start()
                # a station subscribes to its results, not to the requests it sends (each an image)
                obs = Observer(broker.port, topics=("anomaly/+/+/result",))
                with httpx.Client(base_url=agent.http, timeout=120) as client:
                    if max_batch == "auto":
                        agent_ms: list[dict] = []
                        mqtt_ms: list[dict] = []
                        folder_ms: list[dict] = []
                        folder = folder_one(root, folder_ms)
                        lat = alternating({"core": core.block, "http": timed(http_one(client, agent_ms), images),
                                           "mqtt": timed(mqtt_one(obs, mqtt_ms), images),
                                           "folder": timed(folder, images)}, args.runs)
                        out.update({f"{k}_serial" if k != "core" else k: v for k, v in lat.items()})
                        # the agent's own view of the HTTP requests: compute, and time in queue / delivery
                        # (warm-ups included: the HTTP block does not tell them apart; 4 of 44)
                        out["http_agent_inference_p50_ms"] = stage_p50(agent_ms, "inference")
                        out["http_agent_queue_p50_ms"] = stage_p50(agent_ms, "queue")
                        out["mqtt_agent_inference_p50_ms"] = stage_p50(mqtt_ms, "inference")
                        out["mqtt_agent_queue_p50_ms"] = stage_p50(mqtt_ms, "queue")
                        folder.collect()  # type: ignore[attr-defined]
                        out["folder_agent_inference_p50_ms"] = stage_p50(folder_ms, "inference")
                        out["stages_p50_ms"] = {  # where the agent's compute differs from the core's, if it does
                            who: {k: stage_p50(rows, k) for k in ("decode", "preprocess", "backbone", "knn",
                                                                  "postprocess")}
                            for who, rows in (("core", core.stages), ("agent_http", agent_ms))}
                    out[f"mqtt_burst_max_batch_{max_batch}"] = mqtt_burst(obs, images, args.burst, f"b{max_batch}_")
                    out[f"http_burst_max_batch_{max_batch}"] = http_burst(client, images, args.burst)
                obs.close()
                agent.sigterm()
        finally:
            for agent in STARTED:  # never leave an agent running, also when a step failed
                agent.cleanup()
            broker.stop()
            core.close()
    c = out["core"]["p50_ms"]
    for ingress in ("http", "mqtt", "folder"):
        out[f"overhead_{ingress}_p50"] = round(out[f"{ingress}_serial"]["p50_ms"] / c - 1, 3)
        # the daemon's own cost, free of the noise in its compute: round trip - the agent's inference_ms
        # (p50s of the same requests), as a share of the core's p50
        own = out[f"{ingress}_serial"]["p50_ms"] - out[f"{ingress}_agent_inference_p50_ms"]
        out[f"transport_{ingress}_p50_ms"] = round(own, 1)
        out[f"transport_{ingress}_share"] = round(own / c, 3)
    out["core_rps_serial"] = round(1000 / c, 2)
    out["batching_speedup"] = round(out["mqtt_burst_max_batch_8"]["rps"] / out["mqtt_burst_max_batch_auto"]["rps"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
