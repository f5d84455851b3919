"""Two steps of a ROI's model that read every part of it: scoring one embedded image into a Prediction, and a
large fit in chunks. Module functions over a RoiModel, so that the class stays the small hub of its parts."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import cv2

from core.image_io import ImageInput
from core.method.fusion import fuse_maps, fuse_scores
from core.method.heatmap import render_heatmap, thumbnail
from core.method.knn_certified import certified_maps
from core.method.scoring import defect_regions
from core.prediction import Prediction, SearchStats
from core.roi.index import Embedded
from core.roi.lifecycle import apply_suspect_policy

if TYPE_CHECKING:
    from core.roi.model import RoiModel
    from core.roi.sample_store import Sample


def fit_in_steps(model: RoiModel, chunks: Iterable[list[Sample]], between: Callable[[], None] = lambda: None,
                 relabel: bool = False) -> dict:
    """A large fit_ok in chunks (decoded as they come: memory stays bounded), `between()` called after
    each (e.g. to answer other ROIs' predictions); the threshold (leave-one-out scoring) once at the end.
    Same bank as one call: selection is per sample."""
    reports = []
    for chunk in chunks:
        reports.append(model.fit_ok(chunk, finalize=False, relabel=relabel))
        between()
    t0 = time.perf_counter()
    model.finalize()
    threshold_ms = (time.perf_counter() - t0) * 1000
    timings = Counter(threshold=threshold_ms, total=threshold_ms)
    for rep in reports:
        timings.update(rep["timings_ms"])
    return apply_suspect_policy(model, {
        **{k: [x for rep in reports for x in rep[k]] for k in ("added", "duplicates", "stored", "ids")},
        **model.state(), "timings_ms": {k: round(v, 1) for k, v in timings.items()}, "steps": len(reports)})


def predict_one(model: RoiModel, img: ImageInput, emb: Embedded, threshold: float, heatmap: bool, return_map: bool,
                preview_px: int) -> Prediction:
    t0 = time.perf_counter()
    maps = None
    mode, patches = "exact", sum(int(f.shape[0]) for f in emb.feats)
    searched = patches
    if not (heatmap or return_map or model.settings.knn_search == "exact" or model.settings.score_stat != "max"):
        clusters = [branch.clusters() for branch in model.branches]
        if all(c is not None for c in clusters):  # the score and regions from a fraction of the search
            searches = [lambda idx, b=b: model.branches[b].search(emb.feats[b][idx]) for b in range(len(clusters))]
            pairs, info = certified_maps(searches, clusters, emb.feats, emb.grids, emb.input_size,
                                         model.settings.blur_sigma, model.mask_at(emb.input_size), model.scales,
                                         threshold)
            maps = [m for _, m in pairs]
            mode, searched = "certified", int(info["exact_patches"])
    if maps is None:
        dists = [branch.search(emb.feats[b]) for b, branch in enumerate(model.branches)]
    t1 = time.perf_counter()
    if maps is None:
        maps = [model.branch_map(d, emb.grids[b], emb.input_size) for b, d in enumerate(dists)]
    score = fuse_scores([model.map_score(m) for m in maps], model.scales)
    full = cv2.resize(fuse_maps(maps, model.scales), img.size, interpolation=cv2.INTER_LINEAR)
    mask_full = model.mask_at(img.size)
    g = img.geometry  # a JPEG decoded at a reduced scale: regions are reported in the image's own pixels
    count, regions = defect_regions(full, threshold, mask_full, None if img.mm_per_px is None else img.mm_per_px * g,
                                    round(model.settings.min_defect_area_px / (g * g)))
    regions = [r.scaled(g) for r in regions] if g != 1.0 else regions
    png = render_heatmap(img.rgb, full, threshold, mask_full) if heatmap else None
    t2 = time.perf_counter()
    timings = {"preprocess": emb.timings["preprocess"], "backbone": emb.timings["backbone"],
               "knn": (t1 - t0) * 1000, "postprocess": (t2 - t1) * 1000}
    return Prediction(
        is_anomaly=bool(score > threshold), score=score, threshold=threshold,
        threshold_method=model.manifest["threshold"]["method"], timings_ms=timings,
        batch_size=int(emb.timings["batch_size"]), device=str(model.extractor.device), model_version=model.version,
        backbone=model.identity, mm_per_px=img.mm_per_px, scale=img.scale, image_size=img.reported_size,
        defect_count=count, regions=regions, heatmap_png=png, anomaly_map=full if return_map else None,
        preview=thumbnail(img.rgb, full, mask_full, preview_px) if preview_px else None,
        search=SearchStats(mode, patches, searched))
