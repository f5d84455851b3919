"""What the per-ROI self-tuning costs (issue 27, item 3): at fit time and on every prediction.

    .venv/bin/python bench/tuning_cost.py > docs/results/tuning_cost.json

Per dataset (full OK training set, shipped defaults at 320 px): one fit with `branch_select: default` (the
shipped pair, never tuned, but the same three branch banks) and one with `auto`, fit seconds each and the
tuning's own milliseconds (the state's `fusion.ms`) and choice. Then, on the tuned ROI, the prediction of
`--images` test images (decode excluded: `RoiModel.predict` on decoded images) with each fused set in
force: fine + coarse (the shipped pair: one forward), fine + coarse@0.6 and all three (a second, smaller
forward), alternated `--rounds` times; medians per image, and the ratio to the shipped pair from the same
run (timings here move by 50 % between runs: compare ratios, not runs).
"""

from __future__ import annotations

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
from core.roi.model import ModelSettings, RoiModel  # noqa: E402

SETS = {"fine+coarse": [0, 1], "fine+coarse@0.6": [0, 2], "all three": [0, 1, 2]}


def run(name: str, extractor, images: int, rounds: int) -> dict:  # noqa: ANN001 - a FeatureExtractor
    split = SPLITS[name](shared_root())
    samples = [(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in split.train]
    probes = [decode_image(p.read_bytes()) for p, _, _ in split.test[:: max(1, len(split.test) // images)][:images]]
    out: dict = {"dataset": name, "ok_images": len(samples), "probes": len(probes)}
    with tempfile.TemporaryDirectory() as tmp:
        for select in ("default", "auto"):
            model = RoiModel(Path(tmp) / select, "cost", name, extractor, ModelSettings(branch_select=select))
            t0 = time.perf_counter()
            model.fit_ok(samples)
            out[f"fit_s_{select}"] = round(time.perf_counter() - t0, 1)
        fusion = model.state()["fusion"]
        out["chosen"], out["tuning_ms"] = fusion.get("names"), fusion.get("ms", model.manifest["fusion"].get("ms"))
        model.predict(probes[:2])  # warm-up: the certified search's clusters, allocator
        times: dict[str, list[float]] = {k: [] for k in SETS}
        for _ in range(rounds):
            for label, active in SETS.items():
                model.scorer.active = active
                model.predict(probes[:1])  # this set's clusters built outside the timing
                t0 = time.perf_counter()
                model.predict(probes)
                times[label].append((time.perf_counter() - t0) * 1000 / len(probes))
    med = {k: round(statistics.median(v), 1) for k, v in times.items()}
    out["predict_ms"] = med
    out["ratio_to_pair"] = {k: round(v / med["fine+coarse"], 2) for k, v in med.items()}
    return out


def main() -> None:
    cost_main(__doc__, "tuning_cost.py", run)


if __name__ == "__main__":
    main()
