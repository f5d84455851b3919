"""Choice of the detector's defaults on a validation split: backbones, blocks, input size, image
statistic, feature normalisation and the whole-image branch, from cached backbone features.

    .venv/bin/python bench/quality_study.py --backbones efficientnet_lite0 efficientnet_lite1 \
        --resolutions 256 320 > docs/results/quality_study.json

Each dataset's test images are split in two (bench/datasets.py `halves`): every variant is scored on
both halves, the choice is made on `val` and `test` is reported beside it. Banks here are k-center
greedy coresets like the product's (10 %, min 4096, max 8192) but selected in one pass; thresholds are
the 99th percentile of leave-one-out OK scores, as in the product. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, halves, shared_root  # noqa: E402
from image_stats import ImageStatsModel, image_stats  # noqa: E402

from core.backbones import efficientnet_lite, get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.method.coreset import greedy_select, project, projection  # noqa: E402

PATCH_STATS = ("max", "blur_max", "top1", "top5", "max+top5")


def patch_score(grid_dist: np.ndarray, stat: str = "max", blur_patches: float = 0.5) -> float:
    """Image score from the unblurred patch-distance grid [gh, gw].

    max: the single worst patch; top1 / top5: mean of the worst 1 % / 5 % of patches (at least one),
    which grows with a defect's area; max+top5: their mean; blur_max: max after a Gaussian of
    `blur_patches` patches (what a blurred map's max measures).
    """
    g = grid_dist.astype(np.float32)
    if stat == "blur_max":
        return float(cv2.GaussianBlur(g, (0, 0), blur_patches, borderType=cv2.BORDER_REFLECT).max())
    flat = g.ravel()
    if stat == "max":
        return float(flat.max())

    def top(share: float) -> float:
        k = max(1, int(round(flat.size * share)))
        return float(np.partition(flat, flat.size - k)[-k:].mean())

    if stat == "top1":
        return top(0.01)
    if stat == "top5":
        return top(0.05)
    if stat == "max+top5":
        return 0.5 * (float(flat.max()) + top(0.05))
    raise ValueError(f"unknown patch statistic {stat!r}; choose one of {PATCH_STATS}")


torch.set_grad_enabled(False)
NORMS = ["l2", "std"]


def native_sizing(extractor, budget: int) -> None:
    """Input = the ROI at its own scale, shrunk (never enlarged) to at most budget^2 pixels."""
    a = extractor.align

    def size(w: int, h: int) -> tuple[int, int]:
        f = min(1.0, budget / math.sqrt(w * h))
        return max(a, int(round(w * f / a)) * a), max(a, int(round(h * f / a)) * a)

    extractor.input_size = size


def block_maps(extractor, rgb: np.ndarray, blocks: list[int]) -> list[torch.Tensor]:
    batch = extractor.preprocess([rgb])
    return [m.float() for m in extractor.model.forward_blocks(batch, tuple(blocks))]


def patch_feats(maps: list[torch.Tensor], norm: str, stats: list[tuple] | None = None) -> torch.Tensor:
    """Tapped block maps -> [P, D] patch features at the finest grid (the product's recipe)."""
    gh, gw = maps[0].shape[2:]
    parts = []
    for i, fmap in enumerate(maps):
        fmap = F.avg_pool2d(fmap, 3, stride=1, padding=1, count_include_pad=False)
        if fmap.shape[2:] != (gh, gw):
            fmap = F.interpolate(fmap, size=(gh, gw), mode="bilinear", align_corners=False)
        if norm == "l2":
            fmap = F.normalize(fmap, dim=1)
        else:  # per-channel standardisation with the OK patches' statistics, then scaled to unit-ish norm
            mu, sd = stats[i]
            fmap = (fmap - mu.view(1, -1, 1, 1)) / sd.view(1, -1, 1, 1) / math.sqrt(fmap.shape[1])
        parts.append(fmap / math.sqrt(len(maps)))
    feats = torch.cat(parts, dim=1).flatten(2)[0].T
    return F.normalize(feats, dim=-1) if norm == "l2" else feats


def coreset(feats: torch.Tensor) -> torch.Tensor:
    n = feats.shape[0]
    target = min(n, max(4096, math.ceil(0.1 * n)), 8192)
    proj = projection(feats.shape[1], 64)
    sel = greedy_select(project(feats, proj), target)
    return feats[torch.as_tensor(sel)]


def nn_dist(q: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None) -> np.ndarray:
    d = torch.cdist(q, bank)
    if exclude is not None:
        d[:, exclude] = float("inf")
    return d.min(1).values.numpy()


def run_dataset(extractor, split, blocks: list[int], shots: str, combos: list[tuple[int, ...]]) -> list[dict]:
    train = split.train if shots == "full" else split.train[: int(shots)]
    val, test = halves(split)
    cache: dict[Path, tuple[list[torch.Tensor], tuple[int, int]]] = {}

    def maps_of(p: Path):
        if p not in cache:
            img = decode_image(p.read_bytes())
            cache[p] = (block_maps(extractor, img.rgb, blocks), img.size)
        return cache[p]

    t0 = time.perf_counter()
    for p in train:
        maps_of(p)
    for p, _, _ in split.test:
        maps_of(p)
    extract_s = time.perf_counter() - t0
    out = []
    branches: dict[str, tuple[list[dict], dict]] = {}  # "blocks/norm" -> (LOO OK stats, {half: [(y, stats)]})
    for combo in combos:
        idx = [blocks.index(b) for b in combo]
        for norm in NORMS:
            stats = None
            if norm == "std":
                allf = [torch.cat([F.avg_pool2d(maps_of(p)[0][i], 3, 1, 1, count_include_pad=False)
                                   .flatten(2)[0].T for p in train]) for i in idx]
                stats = [(a.mean(0), a.std(0) + 1e-3) for a in allf]
            tr = [patch_feats([maps_of(p)[0][i] for i in idx], norm, stats) for p in train]
            owner = torch.cat([torch.full((f.shape[0],), k) for k, f in enumerate(tr)])
            allp = torch.cat(tr)
            n = allp.shape[0]
            target = min(n, max(4096, math.ceil(0.1 * n)), 8192)
            # k-center greedy over at most 40k patches (a random subset): the study's only shortcut
            pool = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:40000] if n > 40000 else None
            cand = allp if pool is None else allp[pool]
            sel = torch.as_tensor(greedy_select(project(cand, projection(allp.shape[1], 64)), target))
            sel = sel if pool is None else pool[sel]
            bank, bank_owner = allp[sel], owner[sel]
            grid = maps_of(train[0])[0][idx[0]].shape[2:]

            def pscores(dist: np.ndarray, g: tuple[int, int]) -> dict[str, float]:
                return {stat: patch_score(dist.reshape(g), stat) for stat in ("max", "blur_max", "top1", "top5",
                                                                               "max+top5")}

            loo = []
            for k, f in enumerate(tr):
                ex = bank_owner == k
                if bool(ex.all()):
                    continue
                loo.append(pscores(nn_dist(f, bank, ex), tuple(maps_of(train[k])[0][idx[0]].shape[2:])))
            rows = {}
            for part in (val, test):
                recs = []
                for p, label, _ in part.test:
                    maps, _ = maps_of(p)
                    f = patch_feats([maps[i] for i in idx], norm, stats)
                    recs.append((label, pscores(nn_dist(f, bank), tuple(maps[idx[0]].shape[2:]))))
                rows[part.name.split(":")[1]] = recs
            del grid
            branches[f"{'-'.join(map(str, combo))}/{norm}"] = (loo, rows)
            # whole-image branch: channel mean/std of every cached block
            img_models = {}
            if len(train) >= 8:
                for which, sub in (("taps", idx), ("all", list(range(len(blocks))))):
                    img_models[which] = (sub, ImageStatsModel.fit(
                        np.stack([image_stats([maps_of(p)[0][i] for i in sub]) for p in train])))
            for stat in ("max", "blur_max", "top1", "top5", "max+top5"):
                fuses = [("patch", None)] + [(f"{f}:{w}", w) for f in ("image", "zmax", "zsum") for w in img_models]
                for fuse_name, which in fuses:
                    fuse = fuse_name.split(":")[0]
                    sub, img_model = img_models[which] if which else (None, None)
                    res = {"dataset": split.name, "shots": shots, "blocks": list(combo), "norm": norm,
                           "stat": stat, "fuse": fuse_name}
                    ok_p = np.array([s[stat] for s in loo]) if loo else None
                    ok_i = img_model.loo_scores if img_model is not None else None

                    def fused(ps: float, i_score: float | None, fuse=fuse, ok_i=ok_i, ok_p=ok_p) -> float:
                        if fuse == "patch":
                            return ps
                        zi = (i_score - np.mean(ok_i)) / (np.std(ok_i) + 1e-9)
                        if fuse == "image":
                            return zi
                        zp = (ps - np.mean(ok_p)) / (np.std(ok_p) + 1e-9)
                        return max(zp, zi) if fuse == "zmax" else zp + zi

                    ok_f = None
                    if ok_p is not None and len(ok_p):
                        ok_f = np.array([fused(ok_p[j], ok_i[j] if ok_i is not None else None)
                                         for j in range(len(ok_p))])
                    th = float(np.percentile(ok_f, 99)) if ok_f is not None and len(ok_f) else None
                    for half, recs in rows.items():
                        ys, ss = [], []
                        for j, (label, sc) in enumerate(recs):
                            p = (val if half == "val" else test).test[j][0]
                            i_s = None
                            if img_model is not None:
                                i_s = img_model.score(image_stats([maps_of(p)[0][i] for i in sub]))
                            ys.append(label)
                            ss.append(fused(sc[stat], i_s))
                        ys_a, ss_a = np.array(ys), np.array(ss)
                        res[f"{half}_auroc"] = round(float(roc_auc_score(ys_a, ss_a)), 4)
                        if th is not None:
                            dec = ss_a > th
                            res[f"{half}_frr"] = round(float(dec[ys_a == 0].mean()), 3)
                            res[f"{half}_far"] = round(float((~dec[ys_a == 1]).mean()), 3)
                    out.append(res)
                    print(json.dumps(res), file=sys.stderr)
    out += fuse_branches(split.name, shots, branches)
    print(json.dumps({"dataset": split.name, "extract_s": round(extract_s, 1)}), file=sys.stderr)
    return out


def fuse_branches(name: str, shots: str, branches: dict) -> list[dict]:
    """Pairs of patch branches (e.g. fine and coarse blocks): z-scores against each branch's LOO OK
    scores, fused by max or sum."""
    out = []
    keys = sorted(branches)
    for a, b in itertools.combinations(keys, 2):
        for stat in ("max", "blur_max", "top1", "max+top5"):
            la, ra = branches[a]
            lb, rb = branches[b]
            if len(la) != len(lb) or not la:
                continue
            oa, ob = np.array([s[stat] for s in la]), np.array([s[stat] for s in lb])

            def z(v, ok):
                return (v - ok.mean()) / (ok.std() + 1e-9)

            for fuse in ("zmax", "zsum"):
                f = np.maximum if fuse == "zmax" else np.add
                ok_f = f(z(oa, oa), z(ob, ob))
                th = float(np.percentile(ok_f, 99))
                res = {"dataset": name, "shots": shots, "blocks": f"{a}+{b}", "norm": "", "stat": stat,
                       "fuse": fuse}
                for half in ra:
                    ys = np.array([y for y, _ in ra[half]])
                    sa = np.array([s[stat] for _, s in ra[half]])
                    ss = f(z(sa, oa), z(np.array([s[stat] for _, s in rb[half]]), ob))
                    res[f"{half}_auroc"] = round(float(roc_auc_score(ys, ss)), 4)
                    dec = ss > th
                    res[f"{half}_frr"] = round(float(dec[ys == 0].mean()), 3)
                    res[f"{half}_far"] = round(float((~dec[ys == 1]).mean()), 3)
                out.append(res)
                print(json.dumps(res), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[320])
    ap.add_argument("--datasets", nargs="+", default=list(SPLITS))
    ap.add_argument("--shots", nargs="+", default=["full"])
    ap.add_argument("--norms", nargs="+", default=NORMS)
    ap.add_argument("--combos", type=int, default=3, help="first N of: fine (stages 3+5), coarse (5+6), all three")
    ap.add_argument("--native", action="store_true", help="never enlarge a ROI: resolution is a budget")
    args = ap.parse_args()
    NORMS[:] = args.norms
    root = shared_root()
    results = []
    for name, res in itertools.product(args.backbones, args.resolutions):
        ends = efficientnet_lite.stage_ends(name)
        blocks = [ends[2], ends[3], ends[4], ends[5]]  # stages 3-6: strides 8, 16, 16, 32
        combos = [(ends[2], ends[4]), (ends[4], ends[5]), (ends[2], ends[4], ends[5])][: args.combos]
        ex = get_extractor(name, resolution=res, device="cpu", layers=tuple(blocks))
        if args.native:
            native_sizing(ex, res)
        for ds in args.datasets:
            split = SPLITS[ds](root)
            for shots in args.shots:
                for r in run_dataset(ex, split, blocks, shots, combos):
                    results.append({"backbone": name, "resolution": res, **r})
    print(json.dumps({"results": results}, indent=0))


if __name__ == "__main__":
    main()
