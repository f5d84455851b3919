"""Does one ROI's long work hold another ROI's predictions? (issue 35, "honest numbers")

    .venv/bin/python bench/busy_worker.py > docs/results/busy_worker.json

A real daemon (folder mode, shipped config, 320 px): ROI `b` fitted with 8 good tires, ROI `a` with 30 good
magnetic tiles. Then 10 NG tiles are dropped on `a` at once (one send_ng burst: samples embedded, the
threshold decided again with the NG-aware choice, a view tuning from 5 labels), and from the same moment one
good tire every 0.25 s is dropped on `b` for as long as `a`'s work lasts. Reported: how long `a`'s send_ng
took, and the latency of `b`'s predictions (drop to result file) during it: median and max, beside the
latency of `b`'s predictions on an idle worker.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import shared_root  # noqa: E402
from eval import commit  # noqa: E402

from tests.agent_proc import Agent, wait_for  # noqa: E402


def drop(directory: Path, name: str, data: bytes) -> float:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent.parent.parent.parent / f".{name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, directory / name)
    return time.monotonic()


def main() -> None:
    base = shared_root() / "datasets"
    tiles = sorted((base / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))
    ng = sorted((base / "magnetic_tile" / "MT_Blowhole" / "Imgs").glob("*.jpg"))[:10]
    tires = sorted((base / "mvtec_3d_ad" / "tire" / "train" / "good" / "rgb").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        agent = Agent(root, env={"ANOMALY_AGENT_BACKBONE__RESOLUTION": "320",
                                 "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "4096"}).start()
        inbox, results = root / "inbox" / "st", root / "results" / "st"
        try:
            for roi, files in (("b", tires[:8]), ("a", tiles[:30])):
                for i, p in enumerate(files):
                    drop(inbox / roi / "fit_ok", f"{roi}{i}{p.suffix}", p.read_bytes())
                want = len(files)
                wait_for(lambda roi=roi, want=want: len(list((results / roi).glob("*.json"))) == want, 600, roi)
            probe = tires[20].read_bytes()
            idle = []
            for i in range(8):
                t0 = drop(inbox / "b" / "predict", f"idle{i}.png", probe)
                wait_for(lambda i=i: (results / "b" / f"idle{i}.json").exists(), 120, "idle")
                idle.append(time.monotonic() - t0)
            start = time.monotonic()
            for i, p in enumerate(ng):
                drop(inbox / "a" / "send_ng", f"ng{i}.jpg", p.read_bytes())
            sent: dict[str, float] = {}
            done: dict[str, float] = {}
            k = 0
            while len(list((results / "a").glob("ng*.json"))) < len(ng) and time.monotonic() - start < 600:
                name = f"busy{k}"
                sent[name] = drop(inbox / "b" / "predict", f"{name}.png", probe)
                k += 1
                t_end = time.monotonic() + 0.25
                while time.monotonic() < t_end:
                    for n in list(sent):
                        if n not in done and (results / "b" / f"{n}.json").exists():
                            done[n] = time.monotonic()
                    time.sleep(0.01)
            a_s = time.monotonic() - start
            wait_for(lambda: all((results / "b" / f"{n}.json").exists() for n in sent), 600, "busy results")
            for n in sent:
                done.setdefault(n, time.monotonic())
            lat = sorted(done[n] - sent[n] for n in sent)
        finally:
            agent.sigterm()
    out = {"commit": commit(), "command": "bench/busy_worker.py", "send_ng_burst_s": round(a_s, 2),
           "idle_predict_s": {"median": round(sorted(idle)[len(idle) // 2], 3), "max": round(max(idle), 3)},
           "predictions_during": len(lat),
           "busy_predict_s": {"median": round(lat[len(lat) // 2], 3), "max": round(lat[-1], 3)}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
