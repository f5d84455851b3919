"""One embedded image of a ROI -> a Prediction: the scorer's maps and score (core/method/scorer.py), the
verdict against the threshold, defect regions in the image's own pixels (and mm²), the optional heatmap,
full map and preview. Built from explicit inputs: no model, no files."""

from __future__ import annotations

import time
from dataclasses import dataclass

from core.image_io import ImageInput
from core.method.heatmap import render_heatmap, thumbnail
from core.method.scorer import Scorer
from core.method.scoring import defect_regions
from core.prediction import Prediction
from core.roi.index import Embedded


@dataclass(frozen=True)
class Verdict:
    """What a prediction reports besides the image's own figures: the threshold in force and where it came
    from, the model version and backbone that scored, the device."""

    threshold: float
    threshold_method: str
    model_version: int
    backbone: dict
    device: str
    min_defect_area_px: int = 0


def predict_one(scorer: Scorer, img: ImageInput, emb: Embedded, v: Verdict, heatmap: bool = False,
                return_map: bool = False, preview_px: int = 0) -> Prediction:
    t0 = time.perf_counter()
    maps, search, term = scorer.maps(emb.feats, emb.grids, emb.input_size, v.threshold, heatmap or return_map)
    t1 = time.perf_counter()
    score, full = scorer.fuse(maps, img.size, term)
    mask_full = scorer.mask_at(img.size)
    g = img.geometry  # a JPEG decoded at a reduced scale: regions are reported in the image's own pixels
    count, regions = defect_regions(full, v.threshold, mask_full,
                                    None if img.mm_per_px is None else img.mm_per_px * g,
                                    round(v.min_defect_area_px / (g * g)))
    regions = [r.scaled(g) for r in regions] if g != 1.0 else regions
    png = render_heatmap(img.rgb, full, v.threshold, mask_full) if heatmap else None
    t2 = time.perf_counter()
    timings = {"preprocess": emb.timings["preprocess"], "backbone": emb.timings["backbone"],
               "knn": (t1 - t0) * 1000, "postprocess": (t2 - t1) * 1000}
    return Prediction(
        is_anomaly=bool(score > v.threshold), score=score, threshold=v.threshold,
        threshold_method=v.threshold_method, timings_ms=timings, batch_size=int(emb.timings["batch_size"]),
        device=v.device, model_version=v.model_version, backbone=v.backbone, mm_per_px=img.mm_per_px,
        scale=img.scale, image_size=img.reported_size, defect_count=count, regions=regions, heatmap_png=png,
        anomaly_map=full if return_map else None,
        preview=thumbnail(img.rgb, full, mask_full, preview_px) if preview_px else None, search=search)
