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

from tests.agent_proc import STARTED, Agent, Observer, folder_completions, wait_for  # noqa: E402
from tests.broker import Broker, free_port  # noqa: E402

ENV = {"ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0", "ANOMALY_AGENT_BACKBONE__RESOLUTION": "192",
       "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "1000", "ANOMALY_AGENT_FOLDER__STABLE_S": "0.3"}
ROIS = ("a", "b", "c")


def proc_memory(pid: int) -> dict[str, float]:
    """RSS split as the kernel reports it (MB): rss, anon (heap: what the process holds), file (mapped
    files such as a memory-mapped index: page cache the kernel can reclaim), hwm (peak RSS so far)."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "hwm"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k = line.split(":")[0] + ":"
        if k in keys:
            out[keys[k]] = int(line.split()[1]) / 1024
    return out


def flatness(t: list[float], mb: list[float]) -> dict:
    """Median per quarter of the run and the least-squares slope (MB per hour) of a memory series."""
    if len(mb) < 8:
        return {}
    q = np.array_split(np.asarray(mb), 4)
    slope = float(np.polyfit(np.asarray(t), np.asarray(mb), 1)[0]) * 3600
    return {"quarter_medians_mb": [round(float(np.median(x)), 1) for x in q], "slope_mb_per_h": round(slope, 1)}


def pct(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)} | {"n": len(values)}


def variants(images: list[bytes], n: int) -> list[bytes]:
    """n distinct PNGs from real images: the four flips x brightness -5..+5 (distinct bytes, same part)."""
    import hashlib

    import cv2

    per_source = 4 * 11
    if n > per_source * len(images):
        raise ValueError(f"{len(images)} images give at most {per_source * len(images)} distinct variants")
    out, seen = [], set()
    for i in range(n):
        img = cv2.imdecode(np.frombuffer(images[i % len(images)], np.uint8), cv2.IMREAD_COLOR)
        k = i // len(images)
        flip = k % 4
        img = img if flip == 0 else cv2.flip(img, (1, 0, -1)[flip - 1])
        img = np.clip(img.astype(np.int16) + (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5)[k // 4], 0, 255).astype(np.uint8)
        png = cv2.imencode(".png", img)[1].tobytes()
        seen.add(hashlib.sha256(png).hexdigest())
        out.append(png)
    assert len(seen) == n, f"only {len(seen)} of {n} variants are distinct"
    return out


def soak(tmp: Path, n: int, seed: int = 1, outstanding: int = 32, outage_s: float = 0, outage_at_s: float = 20,
         fit_share: float = 0.04, ng_share: float = 0.02, prefit: int = 6, queue_size: int | None = None,
         tire: Path | None = None) -> dict:
    """`queue_size` overrides the worker's queue bound (the CI variant drives it past a small one); `tire`
    the image folder (default ../shared's tire)."""
    tire = tire or shared_root() / "datasets" / "mvtec_3d_ad" / "tire"
    env = {**ENV, **({"ANOMALY_AGENT_WORKER__QUEUE_SIZE": str(queue_size)} if queue_size else {})}
    train = [p.read_bytes() for p in sorted((tire / "train" / "good" / "rgb").glob("*.png"))]
    goods = [p.read_bytes() for p in sorted((tire / "test" / "good" / "rgb").glob("*.png"))]
    holes = [p.read_bytes() for p in sorted((tire / "test" / "hole" / "rgb").glob("*.png"))]
    cuts = [p.read_bytes() for p in sorted((tire / "test" / "cut" / "rgb").glob("*.png"))]
    data = tmp / "data"
    n_fresh = int(n * fit_share * 0.9) + 1
    pool = variants(train, min(prefit + n_fresh, 44 * len(train)))  # distinct images: prefit, then fits
    prefit_dir = tmp / "prefit"
    prefit_dir.mkdir()
    paths = []
    for i, png in enumerate(pool[:prefit]):
        paths.append(prefit_dir / f"{i}.png")
        paths[-1].write_bytes(png)
    for roi in ROIS:
        subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(data), "--log-level", "WARNING", "fit",
                        "--role", "soak", "--roi", roi, "--quiet", *map(str, paths)], env={**os.environ, **ENV},
                       check=True, capture_output=True, cwd=ROOT)
    broker = Broker(tmp / "broker")
    broker.start()
    port = free_port()
    agent = Agent(data, broker.port, env=env, client_id="soak", http_port=port).start()
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
                mem = proc_memory(agent.proc.pid)  # type: ignore[union-attr]
                fds = len(os.listdir(f"/proc/{agent.proc.pid}/fd"))  # type: ignore[union-attr]
                depth = c.get("/health").json()["queue_depth"]
                samples.append({"t": time.monotonic(), "rss_mb": mem["rss"], "anon_mb": mem["anon"], "fds": fds,
                                "queue": depth, "answered": answered()})
                stop.wait(1.0)

    def folder_result(rid: str) -> Path:
        return data / "results" / "soak" / folder_sent[rid][0] / f"{rid}.json"

    def answered() -> int:  # (folder results are mirrored on MQTT too: count MQTT answers by our own ids)
        return (sum(1 for r in list(sent) if r in arrived)
                + sum(1 for r in list(folder_sent) if folder_result(r).exists()))

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
    # distinct new images for the fits (a repeat is a cheap duplicate), 10 % of them sent again
    fresh = iter(pool[prefit:])
    fresh_ng = iter(variants(holes + cuts, min(int(n * ng_share * 0.9) + 1, 44 * len(holes + cuts))))
    fit_at, ng_at, calibrate_at = 1 - 0.05 - 0.005 - ng_share - fit_share, 1 - 0.05 - 0.005 - ng_share, 1 - 0.05 - 0.005
    for i in range(n):
        roll = rng.random()
        roi = rng.choice(ROIS)
        bad = roll >= 0.95
        if roll < fit_at or bad:
            action, image = "predict", rng.choice(goods + holes)
        elif roll < ng_at:
            action, image = "fit_ok", next(fresh, rng.choice(train)) if rng.random() < 0.9 else rng.choice(train)
        elif roll < calibrate_at:
            action, image = "send_ng", next(fresh_ng, rng.choice(holes)) if rng.random() < 0.9 else rng.choice(holes)
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
    t_steady = [s["t"] - t0 for s in steady]
    step = max(1, len(samples) // 120)
    series = [[round(s["t"] - t0, 1), s["answered"], round(s["rss_mb"], 1), round(s["anon_mb"], 1), s["fds"],
               s["queue"]] for s in samples[::step]]
    states = httpx.get(f"{agent.http}/models", timeout=10).json()
    out = {
        "requests": n, "outstanding_max": outstanding, "queue_size": queue_size, "mqtt_sent": len(sent),
        "folder_sent": len(folder_sent),
        "seconds": round(elapsed, 1),
        "requests_per_s": round(n / elapsed, 2),
        "mqtt_answered": len(per_rid), "mqtt_lost": len(set(sent) - set(per_rid)),
        "mqtt_duplicated": sum(v - 1 for v in per_rid.values()),
        "folder_answered": len(folder_results), "folder_lost": len(folder_sent) - len(folder_results),
        # from the append-only completions log: a second processing would overwrite its result file
        "folder_duplicated": sum(c - 1 for f, c in folder_completions(data).items() if f[:-4] in folder_sent),
        "errors_by_code": dict(Counter(r["error"]["code"] for r in list(mqtt_results.values()) + list(
            folder_results.values()) if r["status"] == "error")),
        "mqtt_round_trip": pct(mqtt_lat), "folder_drop_to_result": pct(folder_lat),
        "rss_mb_after_warmup": {"first": round(rss[0], 1), "last": round(rss[-1], 1), "max": round(max(rss), 1)},
        "rss_drift_pct": round((rss[-1] / rss[0] - 1) * 100, 1) if rss[0] else None,
        "rss_flatness": flatness(t_steady, rss), "anon_flatness": flatness(t_steady, [s["anon_mb"] for s in steady]),
        "prefit_per_roi": prefit, "mix": {"fit_ok": fit_share, "send_ng": ng_share, "calibrate": 0.005, "bad": 0.05},
        "final_samples": {m["roi_id"]: m["samples"] for m in states},
        "series_columns": ["t_s", "answered", "rss_mb", "anon_mb", "fds", "queue"], "series": series,
        "fds_after_warmup": {"min": min(fds), "max": max(fds), "last": fds[-1]},
        "queue_depth_max": max((s["queue"] for s in samples), default=0),
        "agent_alive": agent.alive(), "broker_outages": outages,
    }
    try:  # the figures are in; a failing teardown is reported with them, not instead of them
        obs.close()
        agent.sigterm()
        broker.stop()
    except Exception as exc:  # noqa: BLE001
        out["teardown_error"] = repr(exc)
    return out


def grow(tmp: Path, n: int, memory_fit: bool, ram_max_mb: float = 512) -> dict:
    """fit_ok of n distinct images into one ROI (batches of 50 over HTTP); the agent's memory throughout
    (sampled every 0.25 s), against the configured bound: memory_fit_max_mb (memory_fit only) plus the bank."""
    tire = shared_root() / "datasets" / "mvtec_3d_ad" / "tire"
    train = [p.read_bytes() for p in sorted((tire / "train" / "good" / "rgb").glob("*.png"))]
    data = tmp / f"grow_{memory_fit}"
    port = free_port()
    agent = Agent(data, env={**ENV, "ANOMALY_AGENT_DEFAULTS__MEMORY_FIT": str(memory_fit).lower(),
                             "ANOMALY_AGENT_DEFAULTS__MEMORY_FIT_MAX_MB": str(ram_max_mb),
                             "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "4096"}, http_port=port,
                  client_id=f"grow{memory_fit}").start()
    pid = agent.proc.pid  # type: ignore[union-attr]
    images = variants(train, n)
    baseline = proc_memory(pid)
    mem: list[dict] = []
    fitted = [0]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            mem.append({**proc_memory(pid), "fitted": fitted[0]})
            stop.wait(0.25)

    threading.Thread(target=sampler, daemon=True).start()
    t0 = time.monotonic()
    with httpx.Client(base_url=agent.http, timeout=1800) as c:
        for start in range(0, n, 50):
            files = [("files", (f"{i}.png", images[i], "image/png")) for i in range(start, min(n, start + 50))]
            r = c.post("/fit_ok", data={"role_id": "grow", "roi_id": "one"}, files=files)
            r.raise_for_status()
            fitted[0] = min(n, start + 50)
        state = c.get("/models/grow/one").json()
    stop.set()
    seconds = time.monotonic() - t0
    final = proc_memory(pid)
    agent.sigterm()
    index = data / "models" / "grow" / "one" / "index"
    index_bytes = (index / "ok.f32").stat().st_size
    dim = index_bytes // (4 * state["patches"])
    bank_mb = state["bank_size"] * dim * 4 / 2**20
    bound = (min(ram_max_mb, index_bytes / 2**20) if memory_fit else 0) + 2 * bank_mb
    anon_max = max(m["anon"] for m in mem)
    by_step = {}
    for m in mem:
        by_step[m["fitted"]] = max(by_step.get(m["fitted"], 0), m["anon"])
    return {"images": n, "memory_fit": memory_fit, "memory_fit_max_mb": ram_max_mb, "seconds": round(seconds, 1),
            "samples": state["samples"]["ok"], "bank_size": state["bank_size"], "patches": state["patches"],
            "feature_dim": dim, "index_mb_on_disk": round(index_bytes / 2**20, 1), "bank_mb": round(bank_mb, 1),
            "baseline_anon_mb": round(baseline["anon"], 1), "anon_max_mb": round(anon_max, 1),
            "anon_last_mb": round(final["anon"], 1), "file_max_mb": round(max(m["file"] for m in mem), 1),
            "rss_hwm_mb": round(final["hwm"], 1),
            "model_bound_mb": round(bound, 1), "anon_growth_max_mb": round(anon_max - baseline["anon"], 1),
            "anon_growth_last_mb": round(final["anon"] - baseline["anon"], 1),
            "anon_max_by_images_fitted": {k: round(v, 1) for k, v in sorted(by_step.items()) if k % 250 == 0 or k == n}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--outstanding", type=int, default=32, help="requests in flight at most (stations waiting)")
    ap.add_argument("--outage", type=float, default=0, help="stop the broker this many seconds, 20 s into the run")
    ap.add_argument("--grow", type=int, default=0, help="also fit this many images into one ROI, both memory_fit")
    ap.add_argument("--ram-max-mb", type=float, default=512, help="memory_fit_max_mb for --grow")
    ap.add_argument("--prefit", type=int, default=6, help="OK images each ROI is fitted with before the soak")
    ap.add_argument("--fit-share", type=float, default=0.04, help="share of fit_ok requests in the soak")
    ap.add_argument("--ng-share", type=float, default=0.02, help="share of send_ng requests in the soak")
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        try:
            if args.requests:
                out["soak"] = soak(tmp, args.requests, outstanding=args.outstanding, outage_s=args.outage,
                                   fit_share=args.fit_share, ng_share=args.ng_share, prefit=args.prefit)
            if args.grow:
                out["grow"] = [grow(tmp, args.grow, mf, args.ram_max_mb) for mf in (False, True)]
        finally:
            for agent in STARTED:
                agent.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
