"""Can labelled NG images improve the ranking, not only the threshold? (issue 27, item 4)

    .venv/bin/python bench/ng_aware.py > docs/results/ng_aware.json

Per dataset: one ROI fitted on the OK training images (shipped default pair fine + coarse). Of the test
defects, k = 1, 5, 10 per defect class are "labelled NG" (sent as NG samples); everything else in the test
set (its OK images and the other defects) is what the figures are measured on, 3 random draws per k.
Two NG-aware forms, each per branch on the image's most anomalous patches (its top 2 % by OK distance):

- `ng_bank`: the labelled images' own defect patches (their top 2 %) as a second bank; an image's NG
  figure is minus the mean distance of its top patches to that bank (a part that looks like a labelled
  defect ranks higher);
- `linear_head`: a logistic regression, OK bank patches vs those defect patches; the image's figure is the
  mean logit of its top patches.

- `guarded`: what a ROI could do by itself: of {shipped, ng_bank, linear_head}, the form whose 3-fold
  cross-validation over its labelled NG images (figures from two folds, the third scored against the OK
  training images' leave-one-out scores) beats the shipped score's AUROC there by GUARD; else shipped.

Each figure is z-scaled by the OK training images' own (leave-one-out) figures and added to the shipped
score's z (weight 1), as branches fuse. The guard a line needs: FRR on the OK test images at the 99th
percentile of the OK training images' fused scores (the auto policy), beside AUROC and recall at 1 % / 5 %
false rejects on the rest. Nothing here trains features; the head is linear on the frozen backbone.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, defect_kinds, labelled_draw, shared_root  # noqa: E402
from eval import commit, recall_at_frr  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.method.fusion import fuse_scores  # noqa: E402
from core.method.knn import NearestNeighbour  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

TOP = 0.02  # an image's most anomalous share of patches
PAIR = (0, 1)  # the shipped default pair: fine, coarse
SEEDS = 3
KS = (1, 5, 10)
FORMS = ("ng_bank", "linear_head")
GUARD = 0.02  # cross-validated AUROC gain a form needs over the shipped score to be used


def top(d: np.ndarray) -> np.ndarray:
    n = max(1, int(round(TOP * len(d))))
    return np.argsort(d)[-n:]


def image_rows(model: RoiModel, paths: list[Path], leave_out: bool) -> list[dict]:
    """Per image and branch: features and OK distances of its top patches, and the shipped (fused) score."""
    rows = []
    for i, p in enumerate(paths):
        img = decode_image(p.read_bytes())
        emb = model.index.embed([img])[0]
        per, scores = [], []
        for b in PAIR:
            d = model.branches[b].search(emb.feats[b], leave_out=i if leave_out else None)
            t = top(d)
            per.append({"feats": emb.feats[b][t], "d": d[t]})
            scores.append(model.scorer.distances_score(d, emb.grids[b], emb.input_size))
        rows.append({"branches": per, "score": fuse_scores(scores, [model.scorer.scales[b] for b in PAIR])})
    return rows


def nn_dist(a: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """The project's own exact nearest-neighbour distance (core/method/knn.py; features are unit vectors)."""
    knn = NearestNeighbour(torch.from_numpy(np.ascontiguousarray(bank, np.float32)), backend="torch")
    return knn.distances(torch.from_numpy(np.ascontiguousarray(a, np.float32))).numpy()


def ng_figures(rows: list[dict], labelled: list[dict], ok_bank: list[np.ndarray], form: str,
               rng: np.random.Generator) -> np.ndarray:
    """[n_images, branches] NG figure of each image in `rows` from the `labelled` NG images."""
    out = np.zeros((len(rows), len(PAIR)))
    for j in range(len(PAIR)):
        pos = np.concatenate([r["branches"][j]["feats"] for r in labelled])
        if form == "ng_bank":
            for i, r in enumerate(rows):
                out[i, j] = -nn_dist(r["branches"][j]["feats"], pos).mean()
        else:
            neg = ok_bank[j][rng.choice(len(ok_bank[j]), min(len(ok_bank[j]), 20 * len(pos) + 500), replace=False)]
            x = np.r_[neg, pos]
            y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
            head = LogisticRegression(C=0.1, class_weight="balanced", max_iter=500).fit(x, y)
            for i, r in enumerate(rows):
                out[i, j] = head.decision_function(r["branches"][j]["feats"]).mean()
    return out


def z(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (values - ref.mean(0)) / (ref.std(0) + 1e-9)


def fused(base_z: np.ndarray, figures: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return base_z + z(figures, ref).sum(1)


def guarded_choice(train_rows: list[dict], labelled: list[dict], ok_bank: list[np.ndarray], zb_train: np.ndarray,
                   zb_labelled: np.ndarray, seed: int) -> tuple[str, dict]:
    """The form a ROI would pick from its own labelled NG images alone (3-fold cross-validation)."""
    if len(labelled) < 3:
        return "shipped", {}
    folds = np.arange(len(labelled)) % 3
    np.random.default_rng(seed).shuffle(folds)
    labels = np.r_[np.zeros(len(train_rows)), np.ones(len(labelled))]
    gains = {}
    for form in FORMS:
        ng_scores = np.zeros(len(labelled))
        ok_scores = []
        for f in range(3):
            fit = [r for r, g in zip(labelled, folds, strict=True) if g != f]
            held = [i for i in range(len(labelled)) if folds[i] == f]
            ref = ng_figures(train_rows, fit, ok_bank, form, np.random.default_rng(seed))
            fig = ng_figures([labelled[i] for i in held], fit, ok_bank, form, np.random.default_rng(seed))
            ng_scores[held] = fused(zb_labelled[held], fig, ref)
            ok_scores.append(fused(zb_train, ref, ref))
        cv = roc_auc_score(labels, np.r_[np.mean(ok_scores, 0), ng_scores])
        gains[form] = round(float(cv - roc_auc_score(labels, np.r_[zb_train, zb_labelled])), 4)
    best = max(gains, key=gains.get)
    return (best if gains[best] >= GUARD else "shipped"), gains


def measure(labels: np.ndarray, scores: np.ndarray, ok_train: np.ndarray) -> dict:
    cut = float(np.quantile(ok_train, 0.99))
    return {"auroc": round(float(roc_auc_score(labels, scores)), 4),
            "recall_1pct": recall_at_frr(labels, scores, 0.01), "recall_5pct": recall_at_frr(labels, scores, 0.05),
            "frr_auto": round(float((scores[labels == 0] > cut).mean()), 4),
            "far_auto": round(float((scores[labels == 1] <= cut).mean()), 4)}


def run(name: str, extractor) -> dict:  # noqa: ANN001 - a FeatureExtractor
    split = SPLITS[name](shared_root())
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "ng", name, extractor, ModelSettings())
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in split.train])
        t0 = time.perf_counter()
        train_rows = image_rows(model, split.train, leave_out=True)
        test_rows = image_rows(model, [p for p, _, _ in split.test], leave_out=False)
        ok_bank = [model.branches[b].bank.feats.numpy() for b in PAIR]
        embed_s = time.perf_counter() - t0
    labels = np.array([lab for _, lab, _ in split.test])
    kinds = defect_kinds(split)
    classes = sorted(set(kinds) - {"good"})
    base_train = np.array([r["score"] for r in train_rows])
    base_test = np.array([r["score"] for r in test_rows])
    results = []
    for k in KS:
        for seed in range(SEEDS):
            chosen, rest = labelled_draw(kinds, k, seed)
            row = {"k": k, "seed": seed, "labelled": len(chosen), "evaluated": len(rest),
                   "shipped": measure(labels[rest], base_test[rest], base_train)}
            zb_train, zb_test = z(base_train, base_train), z(base_test, base_train)
            labelled = [test_rows[i] for i in chosen]
            for form in FORMS:
                f_train = ng_figures(train_rows, labelled, ok_bank, form, np.random.default_rng(seed))
                f_test = ng_figures([test_rows[i] for i in rest], labelled, ok_bank, form, np.random.default_rng(seed))
                row[form] = measure(labels[rest], fused(zb_test[rest], f_test, f_train),
                                    fused(zb_train, f_train, f_train))
            pick, gains = guarded_choice(train_rows, labelled, ok_bank, zb_train, zb_test[chosen], seed)
            row["guarded"] = {**row[pick], "form": pick, "cv_gain": gains}
            results.append(row)
    summary = {}
    for k in KS:
        rows = [r for r in results if r["k"] == k]
        summary[str(k)] = {f: {m: round(float(np.mean([r[f][m] for r in rows])), 4)
                               for m in ("auroc", "recall_1pct", "recall_5pct", "frr_auto", "far_auto")}
                           for f in ("shipped", *FORMS, "guarded")}
    return {"dataset": name, "classes": classes, "n_train": len(split.train), "n_test": len(split.test),
            "embed_s": round(embed_s, 1), "mean_over_seeds": summary, "runs": results}


def main() -> None:
    extractor = get_extractor("efficientnet_lite0")
    names = sys.argv[1:] or list(SPLITS)
    print(json.dumps({"commit": commit(), "command": "bench/ng_aware.py " + " ".join(names), "top_share": TOP,
                      "results": [run(n, extractor) for n in names]}, indent=1))


if __name__ == "__main__":
    main()
