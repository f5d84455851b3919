"""Which branches a ROI fuses, chosen by the ROI itself at fit time (config `branch_select: auto`).

A ROI's extractor gives every branch (by default fine blocks at full scale, coarse blocks at full scale,
coarse blocks at 0.6 of it: a large, low-contrast defect fills a coarse patch only in a smaller view). Which
of them separate this surface's defects best depends on the surface, and nobody has shown the ROI its
defects. So it makes some: synthetic defects of five kinds (core/method/proxy.py) on a few of its own OK
samples, scored by every branch against the bank without that sample's own patches, beside the
leave-one-out scores of its OK samples. Each candidate set (the fine branch with one or more of the others) is fused as
predictions fuse (core/method/fusion.py); the set whose fused scores separate proxies from OK samples best
(image AUROC) replaces the shipped pair (fine + coarse) only when it beats it by MARGIN. The proxies only
choose among settings; they never train anything (docs/benchmarks.md, "Could a ROI pick its own branch
set?").

Cost: at most `MAX_SOURCES` OK samples x 5 kinds embedded and searched once per tuning; a ROI is tuned
again when its OK set has grown by a quarter (or lost samples), not on every fit.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from core.image_io import ImageInput
from core.method.fusion import BranchScale, fuse_scores
from core.method.proxy import KINDS, make
from core.roi.index import RoiIndex
from core.roi.sample_store import decode_record
from core.storage import RoiStore

log = logging.getLogger(__name__)
MIN_OK = 8  # fewer leave-one-out OK scores: the default pair, no judgement
MAX_SOURCES = 8  # OK samples proxies are made from
REGROW = 1.25  # tuned again when the OK set is this much larger than at the last tuning (or smaller)
DEFAULT = (0, 1)
MARGIN = 0.01  # another set replaces the default pair only when its proxy AUROC is this much higher

MapScore = Callable[[np.ndarray, tuple[int, int], tuple[int, int]], float]  # distances, grid, input -> score


def candidates(n_branches: int) -> list[tuple[int, ...]]:
    """Fused sets of two or more branches that keep the first (finest) one. A branch alone was the riskiest
    pick (bench/self_tune.py), and a set without the fine view lost tire's small cuts (0.890 -> 0.799 when
    the proxies chose the two coarse views: docs/benchmarks.md): synthetic defects cannot vouch for the
    defects a fine view alone sees, so no choice may drop it."""
    return [(0, *c) for k in range(1, n_branches) for c in itertools.combinations(range(1, n_branches), k)]


def choose(ok: np.ndarray, proxies: np.ndarray, scales: Sequence[BranchScale],
           default: tuple[int, ...] = DEFAULT) -> tuple[tuple[int, ...], dict[str, float]]:
    """ok [n, B] leave-one-out and proxies [m, B] branch scores -> (the set to fuse, AUROC of every set)."""
    labels = np.r_[np.zeros(len(ok)), np.ones(len(proxies))]
    aucs = {}
    for c in candidates(ok.shape[1]):
        sc = [scales[b] for b in c]
        fused = [fuse_scores([row[b] for b in c], sc) for row in np.r_[ok, proxies]]
        aucs[c] = float(roc_auc_score(labels, fused))
    best = max(aucs, key=lambda c: (round(aucs[c], 4), c == default))
    if default in aucs and aucs[best] - aucs[default] < MARGIN:
        best = default  # a few dozen proxies cannot tell smaller differences from noise
    return best, {"+".join(map(str, c)): round(a, 4) for c, a in aucs.items()}


def default_fusion(n_branches: int, by: str = "default") -> dict:
    """Before a ROI can judge (fewer than MIN_OK OK samples), or `branch_select: all`."""
    active = list(range(n_branches)) if by == "all" or n_branches < 3 else list(DEFAULT)
    return {"active": active, "by": by, "branches": n_branches}


def current(fusion: dict | None, select: str, n_branches: int) -> dict:
    """The fusion in force: every branch (`branch_select: all`), the shipped pair (`default`: never tuned), the
    ROI's last choice while it fits these
    branches, else the default pair."""
    if select == "all":
        return default_fusion(n_branches, "all")
    if select == "default":
        return default_fusion(n_branches)
    if fusion and fusion.get("branches") == n_branches and fusion.get("by") != "all" and all(
            isinstance(b, int) and 0 <= b < n_branches for b in fusion.get("active", [None])):
        return fusion
    return default_fusion(n_branches)


def due(fusion: dict | None, n_ok: int, n_branches: int) -> bool:
    """Tune now? Never tuned (or for other branches), or the OK set grew by a quarter or shrank since."""
    if n_branches < 3 or n_ok < MIN_OK:
        return False
    if not fusion or fusion.get("by") != "proxy" or fusion.get("branches") != n_branches:
        return True
    then = int(fusion.get("ok_samples", 0))
    return n_ok >= then * REGROW or n_ok < then


def proxy_scores(index: RoiIndex, store: RoiStore, entries: list[int], map_score: MapScore,
                 progress: Callable[[], None]) -> np.ndarray:
    """[m, B] branch scores of synthetic defects made from OK samples number `entries` (the most recent
    `MAX_SOURCES`), each searched without its source sample's own bank entries."""
    records = {r.sample_id: r for r in store.list_samples("ok")}
    ok_entries = index.entries("ok")
    picks = [i for i in entries if ok_entries[i]["sample_id"] in records][-MAX_SOURCES:]
    images = [decode_record(records[ok_entries[i]["sample_id"]], index.extractor.input_size) for i in picks]
    rows = []
    for j, (i, img) in enumerate(zip(picks, images, strict=True)):
        progress()
        base = np.clip(img.rgb * 255, 0, 255).astype(np.uint8)
        other = images[(j + 1) % len(images)].rgb
        other = np.clip(cv2.resize(other, img.size) * 255, 0, 255).astype(np.uint8)
        views = [ImageInput(make(kind, base, other, 1000 * i + k)[0].astype(np.float32) / 255, img.mm_per_px, 1.0,
                            img.size, img.format, img.bit_depth) for k, kind in enumerate(KINDS)]
        for emb in index.embed(views):
            rows.append([map_score(branch.search(emb.feats[b], leave_out=i), emb.grids[b], emb.input_size)
                         for b, branch in enumerate(index.branches)])
    return np.asarray(rows, np.float64).reshape(-1, len(index.branches))


def tune(index: RoiIndex, store: RoiStore, ok_rows: dict, scales: Sequence[BranchScale], map_score: MapScore,
         progress: Callable[[], None]) -> dict:
    """The `fusion` record of the manifest: the branches to fuse, why (every candidate's proxy AUROC), when."""
    t0 = time.perf_counter()
    ok = np.asarray(ok_rows["scores"], np.float64)
    proxies = proxy_scores(index, store, ok_rows["entries"], map_score, progress)
    if len(ok) < 2 or len(proxies) == 0:  # nothing to compare (every OK sample's entries are its own)
        return default_fusion(len(index.branches))
    best, aucs = choose(ok, proxies, scales)
    ms = (time.perf_counter() - t0) * 1000
    names = [b.identity["name"] + f"@{b.identity['resolution']}" for b in index.branches]
    log.info("%s/%s: branches %s chosen from %d OK samples and %d synthetic defects (proxy AUROC %s, %.0f ms)",
             store.role_id, store.roi_id, [names[b] for b in best], len(ok), len(proxies), aucs, ms)
    return {"active": list(best), "names": [names[b] for b in best], "by": "proxy", "branches": len(names),
            "ok_samples": len(index.entries("ok")), "proxy_images": int(len(proxies)), "proxy_auroc": aucs,
            "ms": round(ms)}
