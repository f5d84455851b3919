"""Detection quality on the real datasets: image / pixel AUROC and decisions at the auto threshold.

    .venv/bin/python bench/eval.py --backbone efficientnet_lite0 --shots 1 4 16 full > bench/out/eval.json

Prints one JSON document: per dataset and shot count, image AUROC, pixel AUROC, recall at 1 % and 5 %
false rejects, and the accuracy, false-reject and false-accept rates and the region hit rate (a flagged
defect's region on its mask) at the model's own auto threshold (OK-only, no NG samples), on all
test images and on the validation / test halves (bench/datasets.py `halves`): settings are chosen on
`val_*`, reported on `test_*`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, halves, load_mask, shared_root  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

PIXEL_SIDE = 128  # maps and masks are compared at this long side (pixel AUROC)


def recall_at_frr(labels: np.ndarray, scores: np.ndarray, frr: float) -> float | None:
    """Share of defective images flagged when the threshold lets `frr` of the good ones be rejected (the
    good scores' (1 - frr) quantile): what a line cares about, beside the ranking (AUROC)."""
    good, bad = scores[labels == 0], scores[labels == 1]
    if not len(good) or not len(bad):
        return None
    cut = float(np.quantile(good, 1 - frr, method="higher"))
    return round(float((bad > cut).mean()), 4)


def region_hit(res, mask_path: Path | None) -> bool | None:  # noqa: ANN001 - a core Prediction
    """Whether a flagged defective image has a reported region on its defect (its mask): a verdict right
    for the wrong reason (a region on a stain line) is not a detection. None without a mask."""
    if mask_path is None or not Path(mask_path).exists():
        return None
    w, h = res.image_size
    mask = load_mask(mask_path, (w, h))
    return any(mask[y : y + bh, x : x + bw].any() for x, y, bw, bh in (d.bbox for d in res.regions))


def _rate(values: list[bool | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(sum(got) / len(got), 4) if got else None


def evaluate(split, shots: str, extractor, settings: ModelSettings) -> dict:
    train = split.train if shots == "full" else split.train[: int(shots)]
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "eval", split.name, extractor, settings)
        t0 = time.perf_counter()
        samples = []
        for p in train:
            data = p.read_bytes()
            samples.append((data, decode_image(data), {"source": str(p.name)}))
        model.fit_ok(samples)
        fit_s = time.perf_counter() - t0
        labels, scores, decisions, pix_true, pix_score, hits = [], [], [], [], [], []
        t1 = time.perf_counter()
        for p, label, mask_path in split.test:
            img = decode_image(p.read_bytes())
            res = model.predict([img], return_map=True)[0]
            labels.append(label)
            scores.append(res.score)
            decisions.append(res.is_anomaly)
            hits.append(region_hit(res, mask_path) if label and res.is_anomaly else None)
            amap = res.anomaly_map
            h, w = amap.shape
            f = PIXEL_SIDE / max(h, w)
            size = (max(1, round(w * f)), max(1, round(h * f)))
            pix_score.append(cv2.resize(amap, size, interpolation=cv2.INTER_AREA).ravel())
            pix_true.append(load_mask(mask_path if label else None, size).ravel())
        pred_s = (time.perf_counter() - t1) / len(split.test)
        out = {"dataset": split.name, "shots": shots, "n_train": len(train), "threshold": round(model.threshold, 5),
               "bank_size": model.state()["bank_size"], "bank_sizes": [len(b.bank) for b in model.branches],
               "fit_s": round(fit_s, 1), "predict_ms": round(pred_s * 1000, 1)}
        val, test = halves(split)
        parts = {"all": split.test, "val": val.test, "test": test.test}
        for part, items in parts.items():
            keep = {id(x) for x in items}
            idx = [i for i, x in enumerate(split.test) if id(x) in keep]
            labels_a, dec = np.asarray(labels)[idx], np.asarray(decisions)[idx]
            sc = np.asarray(scores)[idx]
            pt = np.concatenate([pix_true[i] for i in idx])
            ps = np.concatenate([pix_score[i] for i in idx])
            key = "" if part == "all" else f"{part}_"
            out.update({
                f"{key}n_test": len(idx),
                f"{key}image_auroc": round(float(roc_auc_score(labels_a, sc)), 4),
                f"{key}recall_at_1pct_frr": recall_at_frr(labels_a, sc, 0.01),
                f"{key}recall_at_5pct_frr": recall_at_frr(labels_a, sc, 0.05),
                f"{key}pixel_auroc": round(float(roc_auc_score(pt, ps)), 4) if pt.any() else None,
                f"{key}accuracy": round(float((dec == labels_a.astype(bool)).mean()), 4),
                f"{key}false_reject_rate": round(float(dec[labels_a == 0].mean()), 4),
                f"{key}false_accept_rate": round(float((~dec[labels_a == 1]).mean()), 4),
                f"{key}region_hit_rate": _rate([hits[i] for i in idx])})
        return out


def commit() -> str:
    """The commit the figures come from (+ "-dirty" when the work tree differs from it)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "core", "bench"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cost_main(doc: str, script: str, run) -> None:  # noqa: ANN001 - run(name, extractor, images, rounds) -> dict
    """The command line of the per-dataset cost benchmarks (--datasets, --images, --rounds); JSON on stdout."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    extractor = get_extractor("efficientnet_lite0")
    print(json.dumps({"commit": commit(), "command": f"bench/{script} " + " ".join(sys.argv[1:]),
                      "results": [run(n, extractor, a.images, a.rounds) for n in a.datasets]}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--square", action="store_true", help="square resize instead of keeping the aspect")
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--shots", nargs="+", default=["1", "4", "16", "full"])
    ap.add_argument("--score-stat", default=None)
    ap.add_argument("--coreset-ratio", type=float, default=None)
    ap.add_argument("--coreset-min", type=int, default=None)
    ap.add_argument("--coreset-max", type=int, default=None)
    ap.add_argument("--blur-sigma", type=float, default=None)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--layers", default=None, help="one branch: EfficientNet-Lite blocks to tap, e.g. 10,14")
    ap.add_argument("--branches", default=None, help="several branches, e.g. 4,10+10,14 (the default)")
    ap.add_argument("--scales", default=None, help="each branch's input scale, e.g. 1,1,0.5 (default: all 1)")
    args = ap.parse_args()
    settings = ModelSettings()
    for key in ("score_stat", "coreset_ratio", "coreset_min", "coreset_max", "blur_sigma"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    kw = {"layers": tuple(int(x) for x in args.layers.split(","))} if args.layers else {}
    if args.branches:
        kw["branches"] = tuple(tuple(int(x) for x in b.split(",")) for b in args.branches.split("+"))
    if args.scales:
        kw["scales"] = tuple(float(x) for x in args.scales.split(","))
    extractor = get_extractor(args.backbone, resolution=args.resolution, keep_aspect=not args.square,
                              random_weights=args.random_weights, **kw)
    root = shared_root()
    results = []
    for name in args.datasets:
        split = SPLITS[name](root)
        for shots in args.shots:
            r = evaluate(split, shots, extractor, settings)
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    print(json.dumps({"commit": commit(), "command": " ".join(["bench/eval.py", *sys.argv[1:]]),
                      "backbone": extractor.identity.to_dict(),
                      "branches": [i.to_dict() for i in extractor.branch_identities], "settings": settings.__dict__,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
