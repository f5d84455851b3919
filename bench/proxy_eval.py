"""Settings compared on real defects and on the synthetic proxy (core/method/evidence/proxy.py), in one run.

    .venv/bin/python bench/proxy_eval.py > docs/results/proxy_eval.json

For each setting (branches, input scales, resolution) and each dataset: fit the dataset's OK training
images once, score its real test images (image AUROC, recall at 1 % / 5 % false rejects) and a proxy
set made from the held-out good test images (each good image once as is, once with each synthetic
defect kind: AUROC and recall per kind and over all kinds). Then, per dataset, how the proxy's ranking
of the settings agrees with the real defects' ranking (Spearman's rank correlation): settings chosen
on the proxy should also win on defects nobody has shown us, not only on the ones in ../shared.
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
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, shared_root  # noqa: E402
from eval import commit, recall_at_frr  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.method.evidence.proxy import KINDS, make  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

SETTINGS = {  # name -> (branches, scales, resolution)
    "default": (((4, 10), (10, 14)), (1.0, 1.0), 320),
    "coarse_at_0.6": (((4, 10), (10, 14)), (1.0, 0.6), 320),
    "plus_coarse_0.5": (((4, 10), (10, 14), (10, 14)), (1.0, 1.0, 0.5), 320),
    "plus_coarse_0.6": (((4, 10), (10, 14), (10, 14)), (1.0, 1.0, 0.6), 320),
    "coarse_at_0.4": (((4, 10), (10, 14)), (1.0, 0.4), 320),
    "plus_coarse_0.4": (((4, 10), (10, 14), (10, 14)), (1.0, 1.0, 0.4), 320),
}


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def proxy_set(goods: list[Path], seed: int = 7) -> list[tuple[bytes, int, str]]:
    """(image bytes, label, kind): every held-out good image as is, and once per defect kind."""
    out = []
    imgs = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in goods]  # grey tiles as 3 equal channels
    for i, img in enumerate(imgs):
        out.append((_png(img), 0, "good"))
        other = imgs[(i + 1) % len(imgs)]
        if other.shape != img.shape:
            other = cv2.resize(other, (img.shape[1], img.shape[0]))
        for k, kind in enumerate(KINDS):
            bad, mask = make(kind, img, other, seed * 1000 + i * 10 + k)
            if mask.any():
                out.append((_png(bad), 1, kind))
    return out


def metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    return {"image_auroc": round(float(roc_auc_score(labels, scores)), 4),
            "recall_at_1pct_frr": recall_at_frr(labels, scores, 0.01),
            "recall_at_5pct_frr": recall_at_frr(labels, scores, 0.05), "n": int(len(labels))}


def run_setting(name: str, split, max_test: int | None) -> dict:
    branches, scales, resolution = SETTINGS[name]
    ex = get_extractor("efficientnet_lite0", resolution=resolution, branches=branches, scales=scales)
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "eval", split.name, ex, ModelSettings())
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in split.train])
        test = split.test if max_test is None else split.test[:: max(1, len(split.test) // max_test)]
        t0 = time.perf_counter()
        real = np.asarray([model.predict([decode_image(p.read_bytes())])[0].score for p, _, _ in test])
        ms = (time.perf_counter() - t0) * 1000 / len(test)
        labels = np.asarray([label for _, label, _ in test])
        goods = [p for p, label, _ in split.test if label == 0]
        proxy = proxy_set(goods)
        pscores = np.asarray([model.predict([decode_image(b)])[0].score for b, _, _ in proxy])
        plabels = np.asarray([label for _, label, _ in proxy])
        kinds = np.asarray([k for _, _, k in proxy])
        out = {"setting": name, "dataset": split.name, "predict_ms": round(ms, 1), "real": metrics(labels, real),
               "proxy": metrics(plabels, pscores), "proxy_by_kind": {}}
        for kind in KINDS:
            sel = (kinds == "good") | (kinds == kind)
            out["proxy_by_kind"][kind] = metrics(plabels[sel], pscores[sel])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--max-test", type=int, default=None, help="at most this many real test images per dataset")
    args = ap.parse_args()
    root = shared_root()
    rows = []
    for ds in args.datasets:
        split = SPLITS[ds](root)
        for name in args.settings:
            r = run_setting(name, split, args.max_test)
            print(json.dumps(r), file=sys.stderr)
            rows.append(r)
    agreement = {}
    for ds in args.datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        if len(mine) >= 3:
            rho = spearmanr([r["real"]["image_auroc"] for r in mine], [r["proxy"]["image_auroc"] for r in mine])
            agreement[ds] = round(float(rho.statistic), 3)
    print(json.dumps({"commit": commit(), "command": " ".join(["bench/proxy_eval.py", *sys.argv[1:]]),
                      "settings": {k: {"branches": v[0], "scales": v[1], "resolution": v[2]}
                                   for k, v in SETTINGS.items() if k in args.settings},
                      "rank_agreement_real_vs_proxy": agreement, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
