"""NG labels in the ranking as the product does it (`ng_rank: auto`, core/roi/ng_ranking.py), against NG
samples that move only the threshold (`ng_rank: off`). Issue 27, item 4.

    .venv/bin/python bench/ng_rank.py > docs/results/ng_rank.json

Per dataset: one ROI fitted on the OK training images with the shipped defaults (self-tuned branches). Of the
test defects, k = 1, 5, 10 per defect class are sent as NG samples (`send_ng`, as the page's label button or
`calibrate` would); everything else in the test set is scored by the ROI as a prediction scores it (the
scorer's maps, term and fusion on each image's embedding, computed once), 3 random draws per k. Reported per
form: image AUROC, recall at 1 % / 5 % false rejects, and FRR / FAR at the ROI's own threshold (its auto
policy with those NG samples); for `auto` also which form the ROI chose and how often.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, defect_kinds, labelled_draw, shared_root  # noqa: E402
from eval import commit, recall_at_frr  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

SEEDS = 3
KS = (1, 5, 10)
METRICS = ("auroc", "recall_1pct", "recall_5pct", "frr", "far")


def scores(model: RoiModel, embs: list, sizes: list[tuple[int, int]]) -> np.ndarray:
    """Each image's score as `RoiModel.predict` gives it (predict_one without regions and heatmap)."""
    th = float(model.threshold)
    out = []
    for emb, size in zip(embs, sizes, strict=True):
        maps, _, term = model.scorer.maps(emb.feats, emb.grids, emb.input_size, th, False)
        out.append(model.scorer.fuse(maps, size, term)[0])
    return np.asarray(out)


def measure(labels: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    return {"auroc": round(float(roc_auc_score(labels, s)), 4), "recall_1pct": recall_at_frr(labels, s, 0.01),
            "recall_5pct": recall_at_frr(labels, s, 0.05), "frr": round(float((s[labels == 0] > threshold).mean()), 4),
            "far": round(float((s[labels == 1] <= threshold).mean()), 4)}


def run(name: str, extractor) -> dict:  # noqa: ANN001 - a FeatureExtractor
    split = SPLITS[name](shared_root())
    labels = np.array([lab for _, lab, _ in split.test])
    kinds = defect_kinds(split)
    classes = sorted(set(kinds) - {"good"})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fitted = Path(tmp) / "fitted"
        model = RoiModel(fitted, "ng", name, extractor, ModelSettings())
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in split.train])
        images = [decode_image(p.read_bytes()) for p, _, _ in split.test]
        sizes = [img.size for img in images]
        embs = [model.index.embed([img])[0] for img in images]
        del images
        plain = scores(model, embs, sizes)
        for k in KS:
            for seed in range(SEEDS):
                chosen, rest = labelled_draw(kinds, k, seed)
                root = Path(tmp) / f"k{k}-{seed}"
                shutil.copytree(fitted, root)
                t0 = time.perf_counter()
                auto = RoiModel(root, "ng", name, extractor, ModelSettings())
                auto.send_ng([(split.test[i][0].read_bytes(), decode_image(split.test[i][0].read_bytes()), {})
                              for i in chosen])
                send_s = time.perf_counter() - t0
                record = auto.manifest.get("ng_rank") or {}
                s_auto = scores(auto, [embs[i] for i in rest], [sizes[i] for i in rest]) if auto.scorer.ng else \
                    plain[rest]
                th_auto = float(auto.threshold)
                off = RoiModel(root, "ng", name, extractor, ModelSettings(ng_rank="off"))
                results.append({"k": k, "seed": seed, "labelled": len(chosen), "evaluated": len(rest),
                                "form": record.get("form"), "cv_auroc_gain": record.get("cv_auroc_gain"),
                                "send_ng_s": round(send_s, 2),
                                "off": measure(labels[rest], plain[rest], float(off.threshold)),
                                "auto": measure(labels[rest], s_auto, th_auto)})
                shutil.rmtree(root)
    summary = {}
    for k in KS:
        rows = [r for r in results if r["k"] == k]
        summary[str(k)] = {f: {m: round(float(np.mean([r[f][m] for r in rows if r[f][m] is not None])), 4)
                               for m in METRICS} for f in ("off", "auto")}
        summary[str(k)]["forms"] = [r["form"] for r in rows]
    return {"dataset": name, "classes": classes, "n_train": len(split.train), "n_test": len(split.test),
            "fusion": model.manifest.get("fusion", {}).get("active"), "mean_over_seeds": summary, "runs": results}


def main() -> None:
    extractor = get_extractor("efficientnet_lite0")
    names = sys.argv[1:] or list(SPLITS)
    print(json.dumps({"commit": commit(), "command": "bench/ng_rank.py " + " ".join(names),
                      "results": [run(n, extractor) for n in names]}, indent=1))


if __name__ == "__main__":
    main()
