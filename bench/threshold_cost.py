"""Cost of keeping the threshold current: one-image fit_ok / send_ng on a ROI with many NG samples.

    .venv/bin/python bench/threshold_cost.py > bench/out/threshold_cost.json

Every fit_ok / send_ng rescores the threshold samples (leave-one-out scores of the last
`holdout_max` OK samples and every NG sample). Two copies of the same ROI (magnetic tile: --ok
MT_Free images in the bank, --ng Blowhole/Break/Crack images as NG samples, EfficientNet-Lite0 at
320, shipped bank settings) take turns on the same new images: one updates the stored patch
distances by the bank delta (`core/method/bank_distances.py`), the other searches the whole bank every time
(`BankDistances.enabled = False`, the behaviour before). Reported: median ms per request after
--warmup rounds, and their ratio measured in this run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import shared_root  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402


def sample(path: Path) -> tuple[bytes, object, dict]:
    data = path.read_bytes()
    return data, decode_image(data, mm_per_px=0.1), {"source": "bench"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ok", type=int, default=60)
    ap.add_argument("--ng", type=int, default=130)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    base = shared_root() / "datasets" / "magnetic_tile"
    free = sorted((base / "MT_Free" / "Imgs").glob("*.jpg"))
    defects = [p for c in ("MT_Blowhole", "MT_Break", "MT_Crack") for p in sorted((base / c / "Imgs").glob("*.jpg"))]
    rounds = args.rounds + args.warmup
    assert len(free) >= args.ok + rounds and len(defects) >= args.ng + rounds, "not enough images in the dataset"
    ex = get_extractor("efficientnet_lite0", resolution=320, device="cpu")
    settings = ModelSettings()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "a"
        seed = RoiModel(root, "st", "tile", ex, settings)
        seed.fit_ok([sample(p) for p in free[: args.ok]])
        seed.send_ng([sample(p) for p in defects[: args.ng]])
        shutil.copytree(root, Path(tmp) / "b")
        models = {"delta": RoiModel(root, "st", "tile", ex, settings),
                  "full": RoiModel(Path(tmp) / "b", "st", "tile", ex, settings)}
        models["full"]._distances.enabled = False
        fit: dict[str, list[float]] = {k: [] for k in models}
        fit_threshold: dict[str, list[float]] = {k: [] for k in models}
        ng: dict[str, list[float]] = {k: [] for k in models}
        thresholds: dict[str, list[float]] = {k: [] for k in models}
        for r in range(args.warmup + args.rounds):
            ok_img, ng_img = sample(free[args.ok + r]), sample(defects[args.ng + r])
            for name, model in (models.items() if r % 2 == 0 else reversed(list(models.items()))):
                rep = model.fit_ok([ok_img])
                t_ng = model.send_ng([ng_img])
                if r >= args.warmup:
                    fit[name].append(rep["timings_ms"]["total"])
                    fit_threshold[name].append(rep["timings_ms"]["threshold"])
                    ng[name].append(t_ng["timings_ms"]["total"])
                    thresholds[name].append(model.threshold)
        med = {k: {"fit_ok_ms": statistics.median(fit[k]), "fit_ok_threshold_ms": statistics.median(fit_threshold[k]),
                   "send_ng_ms": statistics.median(ng[k])} for k in models}
        out = {"ok_samples": args.ok, "ng_samples": args.ng, "holdout_max": settings.holdout_max,
               "bank": int(models["delta"].branches[0].bank.rows.size), "rounds": args.rounds, "median": med,
               "speedup": {m: round(med["full"][m] / med["delta"][m], 2) for m in med["full"]},
               "same_thresholds": all(abs(a - b) <= 1e-5 * max(1.0, abs(b))
                                      for a, b in zip(thresholds["delta"], thresholds["full"], strict=True))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
