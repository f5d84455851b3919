"""Scores of a ROI's stored samples that place its threshold: leave-one-out OK scores of the most recent
OK samples and the scores of every NG sample, fused over the patch branches (core/method/fusion.py).

One round per threshold update. Each branch brings its samples' patch distances up to date with its
bank (BankDistances); a sample's branch score is recomputed only when that branch's distances changed,
so a fit_ok that changed a few bank entries rescores little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from core.image_io import ImageInput
from core.method.branch import Branch
from core.method.fusion import BranchScale, fuse_scores
from core.method.ng_rank import top_rows
from core.roi.index import RoiIndex
from core.roi.sample_store import decode_record
from core.storage import RoiStore

# (patch distances [P], grid (gh, gw), input size (w, h)) -> map at the input size
MapFn = Callable[[np.ndarray, tuple[int, int], tuple[int, int]], np.ndarray]
ScoreFn = Callable[[np.ndarray], float]  # map -> image score (the configured statistic, inside the mask)


class SampleScorer:
    def __init__(self, map_fn: MapFn, score_fn: ScoreFn, progress: Callable[[], None]) -> None:
        self.map_fn = map_fn
        self.score_fn = score_fn
        self.progress = progress
        self._branch_cache: dict[tuple, tuple[int, float]] = {}  # (kind, id, branch) -> (version, score)
        self.by_sample: dict[str, dict[str, float]] = {"ok": {}, "ng": {}}  # of the last round, by sample id
        # the last round's per-branch scores, and each sample's top patches per branch (core/method/ng_rank.py)
        self.ok_rows: dict = {"ids": [], "entries": [], "scores": [], "tops": []}
        self.ng_rows: dict = {"ids": [], "scores": [], "tops": []}
        self.scales: list[BranchScale] = []


    def plain_scores(self, ready: bool) -> tuple[dict[str, float], dict[str, float]]:
        """(OK, NG) scores by sample id of the last round, before any NG-aware term; empty when not ready."""
        return (self.by_sample.get("ok", {}), self.by_sample.get("ng", {})) if ready else ({}, {})
    def clear(self) -> None:
        """Scores depend on the mask and the map settings: forget them (the distances stay valid)."""
        self._branch_cache.clear()

    def _dists(self, branches: Sequence[Branch], kind: str, i: int, arrays: list[np.ndarray],
               leave_out: int | None) -> list[tuple[np.ndarray, int, dict]]:
        out = []
        for b, branch in enumerate(branches):
            e = branch.emb[kind].entries[i]
            dist, version = branch.sample_dist(kind, e, arrays[b], leave_out)
            out.append((dist, version, e))
        return out

    def _branch_scores(self, kind: str, sid: str, parts: list[tuple[np.ndarray, int, dict]]) -> list[float]:
        scores = []
        for b, (dist, version, e) in enumerate(parts):
            hit = self._branch_cache.get((kind, sid, b))
            if hit is None or hit[0] != version:
                amap = self.map_fn(dist, tuple(e["grid"]), tuple(e["input_size"]))
                hit = self._branch_cache[(kind, sid, b)] = (version, self.score_fn(amap))
            scores.append(hit[1])
        return scores

    @staticmethod
    def _tops(parts: list[tuple[np.ndarray, int, dict]], arrays: list[np.ndarray]) -> list[np.ndarray]:
        """A sample's most anomalous patches' features per branch (what an NG-aware term reads)."""
        return [np.asarray(arrays[b][e["offset"] : e["offset"] + e["count"]])[top_rows(dist)]
                for b, (dist, _, e) in enumerate(parts)]

    def round(self, branches: Sequence[Branch], holdout_max: int, arrays: dict[str, list[np.ndarray]],
              nuisance: Callable[[], list[list[np.ndarray]]],
              active: Sequence[int] | None = None) -> tuple[list[float], list[float], list[BranchScale]]:
        """(leave-one-out OK scores, NG scores, per-branch scales), fused over the `active` branches (None:
        all); every branch's own scores stay in `ok_rows` / `ng_rows` (to choose branches, core/roi/tuning.py).
        `nuisance()` gives the branch maps of views of a single OK sample, for a ROI with nothing to leave out."""
        for branch in branches:
            branch.begin_round()
        ok_parts: list[tuple[str, list, list[float]]] = []
        ok_tops, ng_tops = [], []
        tops = bool(branches[0].emb["ng"].entries)  # only an NG-aware term reads them (core/roi/ng_ranking.py)
        entries = branches[0].emb["ok"].entries
        for i in range(max(0, len(entries) - holdout_max), len(entries)):
            self.progress()
            if any(br.only_from(i) for br in branches):
                continue  # every bank entry is this sample's: nothing to leave it out against
            parts = self._dists(branches, "ok", i, arrays["ok"], i)
            ok_parts.append((entries[i]["sample_id"], parts, self._branch_scores("ok", entries[i]["sample_id"], parts)))
            if tops:
                ok_tops.append(self._tops(parts, arrays["ok"]))
        ng_parts = []
        for i, e in enumerate(branches[0].emb["ng"].entries):
            self.progress()
            parts = self._dists(branches, "ng", i, arrays["ng"], None)
            ng_parts.append((e["sample_id"], parts, self._branch_scores("ng", e["sample_id"], parts)))
            if tops:
                ng_tops.append(self._tops(parts, arrays["ng"]))
        for branch in branches:
            branch.end_round()
        seen = {("ok", sid) for sid, _, _ in ok_parts} | {("ng", sid) for sid, _, _ in ng_parts}
        self._branch_cache = {k: v for k, v in self._branch_cache.items() if k[:2] in seen}
        if not ok_parts and entries:  # a single OK sample: score nuisance views of it instead
            view_maps = nuisance()
            ok_rows = [[self.score_fn(maps[b]) for b in range(len(branches))] for maps in view_maps]
            ok_ids: list[str | None] = [None] * len(ok_rows)  # views, not samples
            ok_tops = []
        else:
            ok_rows, ok_ids = [s for _, _, s in ok_parts], [sid for sid, _, _ in ok_parts]
        self.ok_rows = {"ids": ok_ids, "entries": [i for i in range(len(entries)) if entries[i]["sample_id"] in
                                                   set(ok_ids)], "scores": ok_rows, "tops": ok_tops}
        self.ng_rows = {"ids": [sid for sid, _, _ in ng_parts], "scores": [s for _, _, s in ng_parts], "tops": ng_tops}
        self.scales = [BranchScale.of([row[b] for row in ok_rows]) for b in range(len(branches))]
        ok, ng = self.fuse(active)
        return ok, ng, self.scales

    def fuse(self, active: Sequence[int] | None = None) -> tuple[list[float], list[float]]:
        """The last round's branch scores fused over `active` branches (None: all): (OK, NG) scores; also
        `by_sample`, by sample id."""
        pick = list(active) if active is not None else list(range(len(self.scales)))
        scales = [self.scales[b] for b in pick]
        ok = [fuse_scores([row[b] for b in pick], scales) for row in self.ok_rows["scores"]]
        ng = [fuse_scores([row[b] for b in pick], scales) for row in self.ng_rows["scores"]]
        self.by_sample = {"ok": {sid: x for sid, x in zip(self.ok_rows["ids"], ok, strict=True) if sid is not None},
                          "ng": dict(zip(self.ng_rows["ids"], ng, strict=True))}
        return ok, ng


def nuisance_views(img: ImageInput, stride_px: float) -> list[ImageInput]:
    """Copies of an OK image with the variation a new good part shows on a fixed station: shifted by
    one feature stride, rotated by +-2 degrees, scaled by +-5 %, brightness +-10 %."""
    w, h = img.size
    centre = (w / 2, h / 2)
    views = []
    for angle, scale, dx, dy, gain in ((0, 1, stride_px, 0, 1), (0, 1, 0, stride_px, 1), (2, 1, 0, 0, 1),
                                       (-2, 1, 0, 0, 1), (0, 1.05, 0, 0, 1), (0, 0.95, 0, 0, 1),
                                       (0, 1, 0, 0, 1.1), (0, 1, 0, 0, 0.9)):
        mat = cv2.getRotationMatrix2D(centre, angle, scale)
        mat[:, 2] += (dx, dy)
        rgb = cv2.warpAffine(img.rgb, mat, img.size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        views.append(ImageInput(np.clip(rgb * gain, 0, 1), img.mm_per_px, 1.0, img.size, img.format, img.bit_depth))
    return views


def nuisance_maps(index: RoiIndex, store: RoiStore, map_fn: MapFn) -> list[list[np.ndarray]]:
    """Branch maps of copies of a ROI's one OK sample with a station's usual nuisance (core/method/thresholds.py)."""
    img = decode_record(store.list_samples("ok")[-1], index.extractor.input_size)
    last = index.entries("ok")[-1]
    views = nuisance_views(img, index.extractor.stride * img.size[0] / last["input_size"][0])
    return [[map_fn(branch.search(emb.feats[b]), emb.grids[b], emb.input_size)
             for b, branch in enumerate(index.branches)] for emb in index.embed(views)]
