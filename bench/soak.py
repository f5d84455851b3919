"""Load and soak: many mixed requests through MQTT and the folder; nothing lost or duplicated, memory and
file descriptors flat, queue bounded. Optionally, memory while one ROI grows to N images.

    .venv/bin/python bench/soak.py --requests 10000 > bench/out/soak.json
    .venv/bin/python bench/soak.py --requests 0 --grow 2000 > bench/out/grow.json

A private Mosquitto and `anomaly-agent run` (shipped config, EfficientNet-Lite0 at 192², HTTP on for
/health) with three fitted ROIs; requests: 93 % predict (spread over the ROIs), 1 % fit_ok (new and
repeated images), 0.5 % send_ng, 0.5 % calibrate, 5 % bad (corrupt bytes, unknown ROI, bad base64),
half over MQTT (QoS 1, request ids) and half as files in the watched folder, at most `--outstanding`
(32) in flight, as stations that wait for their answers. The agent's RSS, open
file descriptors and queue depth are sampled every second.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from datasets import shared_root  # noqa: E402

from tests.agent_proc import STARTED, Agent, Observer, wait_for  # noqa: E402
from tests.broker import Broker, free_port  # noqa: E402

ENV = {"ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0", "ANOMALY_AGENT_BACKBONE__RESOLUTION": "192",
       "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "1000", "ANOMALY_AGENT_FOLDER__STABLE_S": "0.3"}
ROIS = ("a", "b", "c")


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def pct(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)} | {"n": len(values)}


def variants(images: list[bytes], n: int) -> list[bytes]:
    """n distinct PNGs from real images: flips and small brightness changes (distinct bytes, same part)."""
    import cv2

    out = []
    for i in range(n):
        img = cv2.imdecode(np.frombuffer(images[i % len(images)], np.uint8), cv2.IMREAD_COLOR)
        k = i // len(images)
        img = cv2.flip(img, 1) if k % 2 else img
        img = np.clip(img.astype(np.int16) + (k // 2) % 7 - 3, 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".png", img)[1].tobytes())
    return out


def soak(tmp: Path, n: int, seed: int = 1, outstanding: int = 32, outage_s: float = 0, outage_at_s: float = 20) -> dict:
    tire = shared_root() / "datasets" / "mvtec_3d_ad" / "tire"
    train = [p.read_bytes() for p in sorted((tire / "train" / "good" / "rgb").glob("*.png"))]
    goods = [p.read_bytes() for p in sorted((tire / "test" / "good" / "rgb").glob("*.png"))]
    holes = [p.read_bytes() for p in sorted((tire / "test" / "hole" / "rgb").glob("*.png"))]
    data = tmp / "data"
    for roi in ROIS:
        paths = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:6]
        subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(data), "--log-level", "WARNING", "fit",
                        "--role", "soak", "--roi", roi, "--quiet", *map(str, paths)], env={**os.environ, **ENV},
                       check=True, capture_output=True, cwd=ROOT)
    broker = Broker(tmp / "broker")
    broker.start()
    port = free_port()
    agent = Agent(data, broker.port, env=ENV, client_id="soak", http_port=port).start()
    obs = Observer(broker.port, topics=("anomaly/soak/+/result",), persistent=True)
    rng = random.Random(seed)
    sent: dict[str, float] = {}  # MQTT request id -> monotonic send time
    arrived: dict[str, float] = {}  # MQTT request id -> monotonic arrival time of its (first) result
    folder_sent: dict[str, tuple[str, float]] = {}  # folder request -> (roi, wall-clock drop time)
    samples: list[dict] = []
    stop = threading.Event()
    original = obs.client.on_message

    def on_message(client: object, userdata: object, msg: object) -> None:
        try:
            arrived.setdefault(json.loads(msg.payload)["request_id"], time.monotonic())  # type: ignore[attr-defined]
        except (ValueError, KeyError):
            pass
        original(client, userdata, msg)

    obs.client.on_message = on_message

    def sampler() -> None:
        with httpx.Client(base_url=agent.http, timeout=10) as c:
            while not stop.is_set():
                rss, fds = proc_stats(agent.proc.pid)  # type: ignore[union-attr]
                depth = c.get("/health").json()["queue_depth"]
                samples.append({"t": time.monotonic(), "rss_mb": rss, "fds": fds, "queue": depth})
                stop.wait(1.0)

    def folder_result(rid: str) -> Path:
        return data / "results" / "soak" / folder_sent[rid][0] / f"{rid}.json"

    def answered() -> int:  # (folder results are mirrored on MQTT too: count MQTT answers by our own ids)
        return sum(1 for r in sent if r in arrived) + sum(1 for r in folder_sent if folder_result(r).exists())

    outages: list[dict] = []

    def outage() -> None:  # the broker goes away for `outage_s` in the middle of the stream
        stop.wait(outage_at_s)
        if stop.is_set():
            return
        down = time.monotonic()
        broker.stop()
        stop.wait(outage_s)
        broker.start()
        outages.append({"down_s": round(time.monotonic() - down, 1), "at_s": round(down - t0, 1)})

    threading.Thread(target=sampler, daemon=True).start()
    t0 = time.monotonic()
    if outage_s:
        threading.Thread(target=outage, daemon=True).start()
    fresh = iter(variants(train, max(1, n // 10)))
    for i in range(n):
        roll = rng.random()
        roi = rng.choice(ROIS)
        bad = roll >= 0.95
        if roll < 0.93 or bad:
            action, image = "predict", rng.choice(goods + holes)
        elif roll < 0.94:
            action, image = "fit_ok", next(fresh, rng.choice(train))
        elif roll < 0.945:
            action, image = "send_ng", rng.choice(holes)
        else:
            action, image = "calibrate", None
        rid = f"s{i}"
        if i % 2 == 0:  # MQTT
            body: dict = {"request_id": rid}
            topic_roi = roi
            if bad:  # a truncated image, an unknown ROI or bad base64
                kind = rng.randrange(3)
                topic_roi = "nope" if kind == 1 else roi
                body["image_b64"] = "!!notbase64" if kind == 2 else base64.b64encode(
                    image[:5000] if kind == 0 else image).decode()
            elif image is not None:
                body["image_b64"] = base64.b64encode(image).decode()
            sent[rid] = time.monotonic()
            obs.client.publish(f"anomaly/soak/{topic_roi}/{action}", json.dumps(body), qos=1)
        else:  # folder (no calibrate folder: a predict instead); bad = a truncated image
            folder_action = "predict" if action == "calibrate" else action
            data_bytes = image[:5000] if bad and image else (image or rng.choice(goods))
            inbox = data / "inbox" / "soak" / roi / folder_action
            inbox.mkdir(parents=True, exist_ok=True)
            tmpf = inbox / f".{rid}.png.part"
            tmpf.write_bytes(data_bytes)
            folder_sent[rid] = (roi, time.time())
            os.rename(tmpf, inbox / f"{rid}.png")
        if i % 8 == 7:  # stations wait for answers: at most `outstanding` requests in flight
            wait_for(lambda k=i: answered() >= k + 1 - outstanding, 900, "backlog")
    wait_for(lambda: answered() >= n, 1800, "every answer")
    elapsed = time.monotonic() - t0
    time.sleep(2)  # late duplicates, if any, would arrive now
    stop.set()
    from collections import Counter

    per_rid = Counter(r["request_id"] for r in obs.results() if r["request_id"] in sent)
    mqtt_lat = [(arrived[r] - sent[r]) * 1000 for r in sent if r in arrived]
    folder_results, folder_lat = {}, []
    for rid, (_, t_drop) in folder_sent.items():
        p = folder_result(rid)
        if p.exists():
            folder_results[rid] = json.loads(p.read_text())
            folder_lat.append((p.stat().st_mtime - t_drop) * 1000)
    mqtt_results = {r["request_id"]: r for r in obs.results() if r["request_id"] in sent}
    steady = [s for s in samples if s["t"] - t0 > 0.1 * elapsed]
    rss = [s["rss_mb"] for s in steady] or [0]
    fds = [s["fds"] for s in steady] or [0]
    out = {
        "requests": n, "outstanding_max": outstanding, "mqtt_sent": len(sent), "folder_sent": len(folder_sent),
        "seconds": round(elapsed, 1),
        "requests_per_s": round(n / elapsed, 2),
        "mqtt_answered": len(per_rid), "mqtt_lost": len(set(sent) - set(per_rid)),
        "mqtt_duplicated": sum(v - 1 for v in per_rid.values()),
        "folder_answered": len(folder_results), "folder_lost": len(folder_sent) - len(folder_results),
        "errors_by_code": dict(Counter(r["error"]["code"] for r in list(mqtt_results.values()) + list(
            folder_results.values()) if r["status"] == "error")),
        "mqtt_round_trip": pct(mqtt_lat), "folder_drop_to_result": pct(folder_lat),
        "rss_mb_after_warmup": {"first": round(rss[0], 1), "last": round(rss[-1], 1), "max": round(max(rss), 1)},
        "rss_drift_pct": round((rss[-1] / rss[0] - 1) * 100, 1) if rss[0] else None,
        "fds_after_warmup": {"min": min(fds), "max": max(fds), "last": fds[-1]},
        "queue_depth_max": max((s["queue"] for s in samples), default=0),
        "agent_alive": agent.alive(), "broker_outages": outages,
    }
    obs.close()
    agent.sigterm()
    broker.stop()
    return out


def grow(tmp: Path, n: int, memory_fit: bool) -> dict:
    """fit_ok of n distinct images into one ROI (batches of 50 over HTTP); the agent's RSS throughout."""
    tire = shared_root() / "datasets" / "mvtec_3d_ad" / "tire"
    train = [p.read_bytes() for p in sorted((tire / "train" / "good" / "rgb").glob("*.png"))]
    data = tmp / f"grow_{memory_fit}"
    port = free_port()
    agent = Agent(data, env={**ENV, "ANOMALY_AGENT_DEFAULTS__MEMORY_FIT": str(memory_fit).lower(),
                             "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "4096"}, http_port=port,
                  client_id=f"grow{memory_fit}").start()
    rss = []
    t0 = time.monotonic()
    images = variants(train, n)
    with httpx.Client(base_url=agent.http, timeout=1800) as c:
        for start in range(0, n, 50):
            files = [("files", (f"{i}.png", images[i], "image/png")) for i in range(start, min(n, start + 50))]
            r = c.post("/fit_ok", data={"role_id": "grow", "roi_id": "one"}, files=files)
            r.raise_for_status()
            rss.append(proc_stats(agent.proc.pid)[0])  # type: ignore[union-attr]
        state = c.get("/models/grow/one").json()
    agent.sigterm()
    index = sum(p.stat().st_size for p in (data / "models" / "grow" / "one" / "index").glob("*"))
    return {"images": n, "memory_fit": memory_fit, "seconds": round(time.monotonic() - t0, 1),
            "samples": state["samples"]["ok"], "bank_size": state["bank_size"], "patches": state["patches"],
            "index_mb_on_disk": round(index / 2**20, 1), "rss_mb": {"after_first_50": round(rss[0], 1),
                                                                    "max": round(max(rss), 1),
                                                                    "last": round(rss[-1], 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--outstanding", type=int, default=32, help="requests in flight at most (stations waiting)")
    ap.add_argument("--outage", type=float, default=0, help="stop the broker this many seconds, 20 s into the run")
    ap.add_argument("--grow", type=int, default=0, help="also fit this many images into one ROI, both memory_fit")
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        try:
            if args.requests:
                out["soak"] = soak(tmp, args.requests, outstanding=args.outstanding, outage_s=args.outage)
            if args.grow:
                out["grow"] = [grow(tmp, args.grow, mf) for mf in (False, True)]
        finally:
            for agent in STARTED:
                agent.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
