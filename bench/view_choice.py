"""Does a ROI choose views that see defect kinds it never had? Leave-one-class-out (issue 34, item 5).

    .venv/bin/python bench/view_choice.py > docs/results/view_choice.json

For each dataset: the product's model (shipped defaults: four branches, `branch_select: auto`) fitted on the
OK training images, as `fit_ok` does; its own choice from OK samples only (held-out proxies) is what a
ROI without NG samples uses. Every test image's branch scores are computed once; a branch set's score is
the product's fusion of them. Reported:
- `ok_only`: the chosen set, the shipped pair (fine + coarse) and the best set on the real defects, with image
  AUROC, recall at 1 % and 5 % false rejects, and FRR / FAR at the model's auto threshold;
- `leave_one_class_out`: for each defect class, `--draws` random draws of `--labels` labelled NG images of
  every *other* class (and none of it): the choice the product makes with those labels
  (core/method/evidence/views.py, incumbent = the OK-only choice), judged on the good test images and the left
  out class only: what a ROI calibrated on some kinds does on a kind nobody labelled;
- `labelled_heldout`: labels drawn from every class (`--labels` each, at least 3, with three or more classes
  about 2 x `--labels` in all), judged on the other images: labels of the kinds the line sees.
Texture (magnetic_tile) and object (tire, juice_bottle) datasets are reported separately (`family`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, defect_kinds, shared_root  # noqa: E402
from eval import commit, recall_at_frr  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.method.evidence import views as view_choice  # noqa: E402
from core.method.fusion import fuse_scores  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

FAMILY = {"magnetic_tile": "texture", "tire": "object", "juice_bottle": "object"}


def branch_rows(model: RoiModel, paths: list[Path]) -> np.ndarray:
    """[images, branches] each branch's image score of each image (the whole bank, the exact search)."""
    out = []
    for p in paths:
        emb = model.index.embed([decode_image(p.read_bytes())])[0]
        out.append([model.scorer.distances_score(br.search(emb.feats[b]), emb.grids[b], emb.input_size)
                    for b, br in enumerate(model.branches)])
    return np.asarray(out, np.float64)


def fused(rows: np.ndarray, subset: tuple[int, ...], model: RoiModel) -> np.ndarray:
    scales = [model.scorer.scales[b] for b in subset]
    return np.asarray([fuse_scores([r[b] for b in subset], scales) for r in rows])


def figures(labels: np.ndarray, scores: np.ndarray, threshold: float | None = None) -> dict:
    out = {"auroc": round(float(roc_auc_score(labels, scores)), 4),
           "recall_at_1pct_frr": recall_at_frr(labels, scores, 0.01),
           "recall_at_5pct_frr": recall_at_frr(labels, scores, 0.05)}
    if threshold is not None:
        flag = scores > threshold
        out.update(frr=round(float(flag[labels == 0].mean()), 4), far=round(float((~flag[labels == 1]).mean()), 4))
    return out


def run(name: str, split, args) -> dict:  # noqa: ANN001 - a bench/datasets.py Split
    extractor = get_extractor("efficientnet_lite0")
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "eval", name, extractor, ModelSettings())
        t0 = time.perf_counter()
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in split.train])
        fit_s = time.perf_counter() - t0
        fusion = dict(model.manifest["fusion"])
        ok_ev, px_ev = model._view_cache["ok"], model._view_cache["proxies"]
        ok_loo = np.asarray(model._samples_scorer.ok_rows["scores"], np.float64)
        paths = [p for p, _, _ in split.test]
        labels = np.asarray([lab for _, lab, _ in split.test])
        kinds = defect_kinds(split)
        t1 = time.perf_counter()
        rows = branch_rows(model, paths)
        score_s = time.perf_counter() - t1
        sets = view_choice.candidates(len(model.branches))
        real = {view_choice.name(s): figures(labels, fused(rows, s, model)) for s in sets}
        chosen = tuple(fusion["active"])
        names = [b.identity["name"] + f"@{b.identity['resolution']}" for b in model.branches]
        out = {"dataset": name, "family": FAMILY.get(name), "n_train": len(split.train), "fit_s": round(fit_s, 1),
               "score_s": round(score_s, 1), "branches": names, "fusion": fusion,
               "ok_only": {"chosen": view_choice.name(chosen),
                           "chosen_figures": figures(labels, fused(rows, chosen, model), model.threshold),
                           "default": real["0+1"], "best": max(real.items(), key=lambda kv: kv[1]["auroc"])},
               "sets": real}
        loco = []
        classes = sorted(set(kinds) - {"good"})
        rng = np.random.default_rng(0)
        helds = classes if len(classes) > 1 else []
        for held in [*helds, None]:  # None: every class labelled, judged on its other images
            for draw in range(args.draws):
                pool = [c for c in classes if c != held] if held else classes
                k = args.labels if held or len(classes) < 3 else max(3, args.labels * 2 // len(classes))
                lab = np.concatenate([rng.choice(np.flatnonzero(kinds == c), min(k, (kinds == c).sum() - 1),
                                                 replace=False) for c in pool])
                ev = view_choice.Evidence(ok_ev, px_ev, rows[lab], ok_loo)
                choice = view_choice.choose(ev, chosen, seed=draw)
                judge = (kinds == "good") | (kinds == held) if held else np.ones(len(kinds), bool)
                judge[lab] = False
                row = {"held_out_class": held, "draw": draw, "labelled": int(len(lab)), "chosen":
                       view_choice.name(choice.active), "changed": choice.changed, "gain": choice.gain,
                       "wins": choice.wins}
                for key, s in (("chosen", choice.active), ("ok_only", chosen), ("default", (0, 1))):
                    row[key + "_figures"] = figures(labels[judge], fused(rows[judge], s, model))
                best = max(sets, key=lambda s: roc_auc_score(labels[judge], fused(rows[judge], s, model)))
                row["best"] = view_choice.name(best)
                row["best_auroc"] = round(float(roc_auc_score(labels[judge], fused(rows[judge], best, model))), 4)
                loco.append(row)
        out["leave_one_class_out"] = [r for r in loco if r["held_out_class"] is not None]
        out["labelled_heldout"] = [r for r in loco if r["held_out_class"] is None]
        out["with_labels_summary"] = {part: _summary(out[part]) for part in ("leave_one_class_out", "labelled_heldout")
                                      if out[part]}
        return out


def _summary(rows: list[dict]) -> dict:
    summary: dict = {}
    for key in ("chosen", "ok_only", "default"):
        a = [r[key + "_figures"]["auroc"] for r in rows]
        r1 = [r[key + "_figures"]["recall_at_1pct_frr"] for r in rows]
        r5 = [r[key + "_figures"]["recall_at_5pct_frr"] for r in rows]
        summary[key] = {"mean_auroc": round(float(np.mean(a)), 4), "mean_recall_1pct": round(float(np.mean(r1)), 4),
                        "mean_recall_5pct": round(float(np.mean(r5)), 4)}
    summary["changed"] = int(sum(r["changed"] for r in rows))
    summary["runs"] = len(rows)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--labels", type=int, default=5, help="labelled NG images per labelled class")
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    root = shared_root()
    results = []
    for ds in args.datasets:
        r = run(ds, SPLITS[ds](root), args)
        print(json.dumps({k: r[k] for k in ("dataset", "fit_s", "fusion", "ok_only", "with_labels_summary")}),
              file=sys.stderr)
        results.append(r)
    print(json.dumps({"commit": commit(), "command": " ".join(["bench/view_choice.py", *sys.argv[1:]]),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
