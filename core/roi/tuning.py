"""Which branches a ROI fuses, chosen by the ROI itself (config `branch_select: auto`).

A ROI's extractor gives every branch (by default fine blocks at full scale, coarse blocks at full scale,
at 0.6 and at 0.4 of it: a large, low-contrast defect fills a coarse patch only in a smaller view). Which
of them see this surface's defects depends on the surface. The evidence (core/method/evidence/views.py):
- held-out proxies: the OK samples are split into `FOLDS` folds; every OK sample of a fold, and synthetic
  defects of five kinds (core/method/evidence/proxy.py) made from a few of them, are scored against the bank without
  that fold's entries: cross-fitted, as a new part is scored against a bank it is not in;
- labels: from 5 labelled NG samples on (suspects left out), their AUROC against the OK leave-one-out
  scores weighs as much as the proxies'.
Every non-empty set of branches is a candidate, coarse-only sets included; the set in force changes only
when another beats it beyond the choice's own (bootstrap) noise. The evidence only chooses among
settings; it never trains anything.

When: the first time a ROI has `MIN_OK` OK samples, when its OK set has grown by a quarter (or lost
samples), and when its labelled NG samples reach 5 and then grow by half: not at every fit or NG sample.
Cost: the held-out search of at most `holdout_max` OK samples (their stored embeddings) and of
`MAX_SOURCES` x 5 proxies embedded once; the OK evidence is kept while the OK set and banks stay, so a
tuning for new labels only rescores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import cv2
import numpy as np

from core.image_io import ImageInput
from core.method.evidence import views as view_choice
from core.method.evidence.proxy import KINDS, make
from core.roi.index import RoiIndex
from core.roi.lifecycle import LifecycleSettings, find_ng_suspects
from core.roi.sample_scores import SampleScorer
from core.roi.sample_store import decode_record
from core.storage import RoiStore

log = logging.getLogger(__name__)
MIN_OK = 8  # fewer OK samples: the default pair, no judgement
MAX_SOURCES = 8  # OK samples proxies are made from
FOLDS = 4  # cross-fitting folds of the OK samples
REGROW = 1.25  # tuned again when the OK set is this much larger than at the last tuning (or smaller)
NG_REGROW = 1.5  # and when the labelled NG samples are this much more than at the last tuning
DEFAULT = (0, 1)
RULE = 3  # the rule a `fusion` record was made by: records of an older rule are tuned again

MapScore = Callable[[np.ndarray, tuple[int, int], tuple[int, int]], float]  # distances, grid, input -> score


def default_fusion(n_branches: int, by: str = "default") -> dict:
    """Before a ROI can judge (fewer than MIN_OK OK samples), or `branch_select: all`."""
    active = list(range(n_branches)) if by == "all" or n_branches < 3 else list(DEFAULT)
    return {"active": active, "by": by, "branches": n_branches}


def current(fusion: dict | None, select: str, n_branches: int) -> dict:
    """The fusion in force: every branch (`branch_select: all`), the shipped pair (`default`: never tuned), the
    ROI's last choice while it fits these branches, else the default pair."""
    if select == "all":
        return default_fusion(n_branches, "all")
    if select == "default":
        return default_fusion(n_branches)
    if fusion and fusion.get("branches") == n_branches and fusion.get("by") != "all" and all(
            isinstance(b, int) and 0 <= b < n_branches for b in fusion.get("active", [None])):
        return fusion
    return default_fusion(n_branches)


def due(fusion: dict | None, n_ok: int, n_branches: int, n_ng: int = 0) -> bool:
    """Tune now? Never tuned (or for other branches, or by an older rule), the OK set grew by a quarter or
    shrank, or the labelled NG samples reached MIN_LABELS, grew by half or shrank since."""
    if n_branches < 3 or n_ok < MIN_OK:
        return False
    if not fusion or not str(fusion.get("by", "")).startswith("proxy") or fusion.get("branches") != n_branches \
            or fusion.get("rule") != RULE:
        return True
    then, then_ng = int(fusion.get("ok_samples", 0)), int(fusion.get("ng_samples", 0))
    if n_ok >= then * REGROW or n_ok < then:
        return True
    labels = view_choice.MIN_LABELS
    return (n_ng >= labels and (then_ng < labels or n_ng >= then_ng * NG_REGROW)) or (then_ng >= labels > n_ng) \
        or (then_ng >= labels and n_ng < then_ng / NG_REGROW)


def folds_of(entries: list[int]) -> dict[int, int]:
    """OK entry number -> its fold: consecutive samples in different folds (drift over time spreads)."""
    return {e: k % FOLDS for k, e in enumerate(entries)}


def heldout_ok(index: RoiIndex, entries: list[int], fold: dict[int, int], map_score: MapScore,
               progress: Callable[[], None]) -> tuple[np.ndarray, list[int]]:
    """([n, B] branch scores of OK samples number `entries`, each against its branch's bank without its
    fold's entries; the entries scored: a fold that owns every entry of a bank is skipped)."""
    arrays = index.arrays("ok")
    members = {f: [e for e in entries if fold[e] == f] for f in range(FOLDS)}
    rows, kept = [], []
    for e in entries:
        progress()
        row = []
        for b, branch in enumerate(index.branches):
            x = branch.emb["ok"].entries[e]
            q = np.array(arrays[b][x["offset"] : x["offset"] + x["count"]])
            dist = branch.search_without(q, members[fold[e]])
            if dist is None:
                break
            row.append(map_score(dist, tuple(x["grid"]), tuple(x["input_size"])))
        if len(row) == len(index.branches):
            rows.append(row)
            kept.append(e)
    return np.asarray(rows, np.float64).reshape(-1, len(index.branches)), kept


def proxy_scores(index: RoiIndex, store: RoiStore, entries: list[int], fold: dict[int, int], map_score: MapScore,
                 progress: Callable[[], None]) -> np.ndarray:
    """[m, B] branch scores of synthetic defects made from the most recent `MAX_SOURCES` OK samples among
    `entries`, each searched without its source's fold (the other image a foreign texture comes from is of
    that fold too, when it has another)."""
    records = {r.sample_id: r for r in store.list_samples("ok")}
    ok_entries = index.entries("ok")
    picks = [i for i in entries if ok_entries[i]["sample_id"] in records][-MAX_SOURCES:]
    images = [decode_record(records[ok_entries[i]["sample_id"]], index.extractor.input_size) for i in picks]
    members = {f: [e for e in entries if fold[e] == f] for f in range(FOLDS)}
    rows = []
    for j, (i, img) in enumerate(zip(picks, images, strict=True)):
        progress()
        base = np.clip(img.rgb * 255, 0, 255).astype(np.uint8)
        same = [k for k, p in enumerate(picks) if fold[p] == fold[i] and k != j]
        other = images[same[0] if same else (j + 1) % len(images)].rgb
        other = np.clip(cv2.resize(other, img.size) * 255, 0, 255).astype(np.uint8)
        views = [ImageInput(make(kind, base, other, 1000 * i + k)[0].astype(np.float32) / 255, img.mm_per_px, 1.0,
                            img.size, img.format, img.bit_depth) for k, kind in enumerate(KINDS)]
        for emb in index.embed(views):
            row = [branch.search_without(emb.feats[b], members[fold[i]]) for b, branch in enumerate(index.branches)]
            if all(d is not None for d in row):
                rows.append([map_score(d, emb.grids[b], emb.input_size) for b, d in enumerate(row)])
    return np.asarray(rows, np.float64).reshape(-1, len(index.branches))


def ok_evidence(index: RoiIndex, store: RoiStore, entries: list[int], map_score: MapScore,
                progress: Callable[[], None], cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """(held-out OK rows, proxy rows) of the OK samples number `entries`; kept in `cache` while the OK set and
    the banks are the same (a tuning for new labels only rescores)."""
    ids = [index.entries("ok")[e]["sample_id"] for e in entries]
    key = (tuple(ids), tuple(len(b) for b in index.branches), tuple(b.identity["name"] for b in index.branches))
    if cache.get("key") != key:
        fold = folds_of(entries)
        ok, kept = heldout_ok(index, entries, fold, map_score, progress)
        proxies = proxy_scores(index, store, kept, fold, map_score, progress) if len(kept) >= 2 else ok[:0]
        cache.clear()
        cache.update(key=key, ok=ok, proxies=proxies)
    return cache["ok"], cache["proxies"]


def tune(index: RoiIndex, store: RoiStore, rows: dict, incumbent: dict, map_score: MapScore,
         progress: Callable[[], None], cache: dict, ng_suspects: set[str] | frozenset[str] = frozenset()) -> dict:
    """The `fusion` record of the manifest: the branches to fuse, what chose them (every candidate's figures),
    when. `rows`: the round's {"ok": ok_rows, "ng": ng_rows} (core/roi/sample_scores.py); `incumbent`: the
    fusion in force (kept unless another set beats it beyond the noise)."""
    t0 = time.perf_counter()
    n = len(index.branches)
    ok, proxies = ok_evidence(index, store, list(rows["ok"]["entries"]), map_score, progress, cache)
    if len(ok) < 2 or len(proxies) == 0:  # nothing to compare (every OK sample's entries are its own)
        return default_fusion(n)
    ng = [s for sid, s in zip(rows["ng"]["ids"], rows["ng"]["scores"], strict=True) if sid not in ng_suspects]
    ev = view_choice.Evidence(ok, proxies, np.asarray(ng, np.float64).reshape(-1, n),
                              np.asarray(rows["ok"]["scores"], np.float64).reshape(-1, n))
    before = tuple(incumbent.get("active", DEFAULT))
    choice = view_choice.choose(ev, before)
    ms = (time.perf_counter() - t0) * 1000
    names = [b.identity["name"] + f"@{b.identity['resolution']}" for b in index.branches]
    log.info("%s/%s: branches %s %s by %s from %d OK samples, %d synthetic defects, %d labelled NG (gain %+.4f, "
             "won %.0f%% of resamples; %.0f ms)", store.role_id, store.roi_id, [names[b] for b in choice.active],
             "chosen" if choice.changed else "kept", choice.by, len(ok), len(proxies), len(ev.ng), choice.gain,
             100 * choice.wins, ms)
    return {"active": list(choice.active), "names": [names[b] for b in choice.active], "by": choice.by,
            "rule": RULE, "branches": n, "changed": choice.changed, "previous": list(before),
            "gain": choice.gain, "wins": choice.wins, "ok_samples": len(index.entries("ok")),
            "ng_samples": len(ev.ng), "heldout_ok": len(ok), "proxy_images": int(len(proxies)),
            "candidates": choice.figures, "ms": round(ms)}


def retune(index: RoiIndex, store: RoiStore, rows: SampleScorer, fusion: dict, map_score: MapScore,
           progress: Callable[[], None], cache: dict, lifecycle: LifecycleSettings) -> dict:
    """After a threshold round (`rows`, fused over `fusion`, the set in force): the fusion to use, tuned when
    `due` (NG samples that score like good parts are not labels: lifecycle.find_ng_suspects)."""
    suspects = {x["sample_id"] for x in find_ng_suspects(*rows.plain_scores(True), lifecycle)}
    if not due(fusion, len(index.entries("ok")), len(index.branches), len(rows.ng_rows["ids"]) - len(suspects)):
        return fusion
    return tune(index, store, {"ok": rows.ok_rows, "ng": rows.ng_rows}, fusion, map_score, progress, cache, suspects)
