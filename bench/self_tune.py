"""Would a ROI choose its own branch set well? Per-ROI self-tuning (issue 27, item 3), measured before it is built.

    .venv/bin/python bench/self_tune.py > docs/results/self_tune.json

For each dataset: one model with every candidate branch (fine 4+10 at 1, coarse 10+14 at 1, coarse 10+14 at
each smaller scale) fitted on the OK training images minus a tuning fifth. Each branch's image score of
every real test image, every tuning image and every proxy defect made from a tuning image
(core/method/evidence/proxy.py) is computed once; a branch subset's score is then the same z-fusion the product
uses (core/method/fusion.py) over that subset. Reported per subset: real test AUROC and recall at 5 %
false rejects, proxy AUROC (tuning images vs their proxies: what a ROI could compute from its own OK
samples at fit time). Then the subset the proxy picks, against the shipped default and the best subset on
the real defects: a self-tuning that picks worse than the fixed default is not worth building.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, shared_root  # noqa: E402
from eval import commit, recall_at_frr  # noqa: E402
from proxy_eval import proxy_set  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.method.fusion import fuse_scores  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

DEFAULT = (0, 1)  # fine @1 + coarse @1: the shipped default


def branch_scores(model: RoiModel, data: list[bytes]) -> np.ndarray:
    """[images, branches] image scores, each branch's own statistic of its own map."""
    out = []
    for b in data:
        img = decode_image(b)
        emb = model.index.embed([img])[0]
        maps, _, _ = model.scorer.maps(emb.feats, emb.grids, emb.input_size, 1e9, exact_map_needed=True)
        out.append([model.scorer.map_score(m) for m in maps])
    return np.asarray(out, np.float64)


def fused(scores: np.ndarray, subset: tuple[int, ...], model: RoiModel) -> np.ndarray:
    scales = [model.scorer.scales[b] for b in subset]
    return np.asarray([fuse_scores([row[b] for b in subset], scales) for row in scores])


def run(name: str, split, scales: tuple[float, ...], tune_share: float) -> dict:
    branches = ((4, 10), (10, 14)) + ((10, 14),) * len(scales)
    ex = get_extractor("efficientnet_lite0", resolution=320, branches=branches, scales=(1.0, 1.0, *scales))
    n_tune = max(3, int(round(len(split.train) * tune_share)))
    bank, tune = split.train[:-n_tune], split.train[-n_tune:]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = RoiModel(Path(tmp), "eval", name, ex, ModelSettings())
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in bank])
        fit_s = time.perf_counter() - t0
        labels = np.asarray([label for _, label, _ in split.test])
        real = branch_scores(model, [p.read_bytes() for p, _, _ in split.test])
        t1 = time.perf_counter()
        proxy = proxy_set(tune)
        pscores = branch_scores(model, [b for b, _, _ in proxy])
        tune_s = time.perf_counter() - t1
        plabels = np.asarray([label for _, label, _ in proxy])
        names = ["fine@1", "coarse@1", *[f"coarse@{s}" for s in scales]]
        rows = []
        for k in range(1, len(names) + 1):
            for subset in itertools.combinations(range(len(names)), k):
                r, p = fused(real, subset, model), fused(pscores, subset, model)
                rows.append({"subset": [names[b] for b in subset], "ids": list(subset),
                             "real_auroc": round(float(roc_auc_score(labels, r)), 4),
                             "real_recall_5pct": recall_at_frr(labels, r, 0.05),
                             "proxy_auroc": round(float(roc_auc_score(plabels, p)), 4),
                             "proxy_recall_5pct": recall_at_frr(plabels, p, 0.05)})
    picked = max(rows, key=lambda x: (x["proxy_auroc"], -len(x["ids"])))
    default = next(x for x in rows if tuple(x["ids"]) == DEFAULT)
    best = max(rows, key=lambda x: x["real_auroc"])
    return {"dataset": name, "bank_images": len(bank), "tune_images": len(tune), "proxy_images": len(proxy),
            "fit_s": round(fit_s, 1), "tuning_scoring_s": round(tune_s, 1), "subsets": rows,
            "proxy_pick": picked["subset"], "proxy_pick_real_auroc": picked["real_auroc"],
            "default_real_auroc": default["real_auroc"], "best_subset": best["subset"],
            "best_real_auroc": best["real_auroc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--scales", nargs="+", type=float, default=[0.6, 0.4])
    ap.add_argument("--tune-share", type=float, default=0.2)
    args = ap.parse_args()
    root = shared_root()
    results = []
    for ds in args.datasets:
        r = run(ds, SPLITS[ds](root), tuple(args.scales), args.tune_share)
        print(json.dumps({k: v for k, v in r.items() if k != "subsets"}), file=sys.stderr)
        results.append(r)
    print(json.dumps({"commit": commit(), "command": " ".join(["bench/self_tune.py", *sys.argv[1:]]),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
