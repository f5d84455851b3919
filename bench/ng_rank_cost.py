"""What NG labels in the ranking (`ng_rank: auto`) cost: per NG sample sent, per load, per prediction.

    .venv/bin/python bench/ng_rank_cost.py > docs/results/ng_rank_cost.json

Per dataset (full OK training set, shipped defaults): `send_ng` of 10 defects (spread over the classes), its
seconds (beside the same send_ng with `ng_rank: off` on a copy) and the form the ROI chose; the seconds of a
load (RoiModel opened again) and of fitting each form from the ROI's samples; then `--images` good and
`--images` defective test images predicted (decoded beforehand) with each form's term in force, whether or not
the ROI chose it, and without one (the plain score: certified search; a part the term flags takes the exact map
for its regions), alternated `--rounds` times; medians per image, the backbone's own median beside them, and the
term's added milliseconds as a share of the backbone's (the issue's budget: added work <= 50 % of the main
forward). Timings here move by 50 % between runs: compare ratios from one run.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import SPLITS, shared_root  # noqa: E402
from eval import cost_main  # noqa: E402

from core.image_io import decode_image  # noqa: E402
from core.method.ng_rank import FORMS, fit_term, spread_of  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

N_NG = 10


def run(name: str, extractor, images: int, rounds: int) -> dict:  # noqa: ANN001 - a FeatureExtractor
    split = SPLITS[name](shared_root())
    defects = [p for p, lab, _ in split.test if lab]
    ng = defects[:: max(1, len(defects) // N_NG)][:N_NG]
    sets = {kind: [p for p, lab, _ in split.test if lab == (kind == "defects")] for kind in ("good", "defects")}
    probes = {k: [decode_image(p.read_bytes()) for p in v[:: max(1, len(v) // images)][:images]]
              for k, v in sets.items()}
    out: dict = {"dataset": name, "ok_images": len(split.train), "ng_images": len(ng),
                 "probes": {k: len(v) for k, v in probes.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "cost", name, extractor, ModelSettings())
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in split.train])
        shutil.copytree(tmp, Path(tmp + "-off"))
        try:
            off = RoiModel(Path(tmp + "-off"), "cost", name, extractor, ModelSettings(ng_rank="off"))
            t0 = time.perf_counter()
            off.send_ng([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in ng])
            out["send_ng_s_off"] = round(time.perf_counter() - t0, 2)
        finally:
            shutil.rmtree(tmp + "-off")
        t0 = time.perf_counter()
        model.send_ng([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in ng])
        out["send_ng_s"] = round(time.perf_counter() - t0, 2)
        out["ng_rank"] = model.state().get("ng_rank")
        t0 = time.perf_counter()
        RoiModel(Path(tmp), "cost", name, extractor, ModelSettings())
        out["load_s"] = round(time.perf_counter() - t0, 2)
        # each form fitted as the ROI would fit it, whether or not it chose one: a term's cost depends on its
        # figures only through the parts it flags (their regions take the exact map)
        active, rows = model.scorer.active, model._samples_scorer
        ok_tops = [[t[b] for b in active] for t in rows.ok_rows["tops"]]
        ng_tops = [[t[b] for b in active] for t in rows.ng_rows["tops"]]
        banks = [model.branches[b].bank.feats.numpy() for b in active]
        spread = spread_of(model.manifest["ok_scores"])
        terms: dict = {"plain": None}
        for form in FORMS:
            t0 = time.perf_counter()
            terms[form] = fit_term(form, banks, ok_tops, ng_tops, spread)
            out[f"fit_s_{form}"] = round(time.perf_counter() - t0, 2)
        model.predict(probes["good"][:2])  # warm-up
        for kind, images_ in probes.items():
            times: dict[str, list[float]] = {**{k: [] for k in terms}, "backbone": []}
            exact: dict[str, int] = {}
            for _ in range(rounds):
                for label, term in terms.items():
                    model.scorer.ng = term
                    model.predict(images_[:1])  # the certified search's clusters built outside the timing
                    t0 = time.perf_counter()
                    preds = model.predict(images_)
                    times[label].append((time.perf_counter() - t0) * 1000 / len(images_))
                    times["backbone"] += [p.timings_ms["backbone"] for p in preds]  # per image already
                    exact[label] = sum(p.search.mode == "exact" for p in preds)
            med = {k: round(statistics.median(v), 1) for k, v in times.items()}
            out[kind] = {"predict_ms": med, "on_the_exact_map": exact,  # flagged by the term: regions need it
                         "added_share_of_backbone": {f: round((med[f] - med["plain"]) / med["backbone"], 2)
                                                     for f in FORMS}}
    return out


def main() -> None:
    cost_main(__doc__, "ng_rank_cost.py", run)


if __name__ == "__main__":
    main()
