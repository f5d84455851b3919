"""How often the suspect rule (core/roi/lifecycle.py find_suspects) flags a GOOD training sample, and whether it
flags one defective image slipped into the OK set.

    .venv/bin/python bench/suspects.py > bench/out/suspects.json

Per dataset (bench/datasets.py, full training set, shipped defaults): the OK samples flagged among the
leave-one-out scores of the last `holdout_max` (50) OK samples (false flags), then, for the first 5
anomalous test images in turn, a copy of the model fed that one image as OK: is it flagged?
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import juice_bottle, magnetic_tile, shared_root, tire  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.roi import lifecycle  # noqa: E402
from core.roi.model import RoiModel  # noqa: E402


def sample(p: Path) -> tuple:
    data = p.read_bytes()
    return data, decode_image(data), {"source": "bench"}


def main() -> None:
    root = shared_root()
    ext = get_extractor("efficientnet_lite0", device="cpu")
    out = []
    for split in (magnetic_tile(root), tire(root), juice_bottle(root)):
        with tempfile.TemporaryDirectory() as tmp:
            model = RoiModel(Path(tmp), "bench", "roi", ext)
            model.fit_ok([sample(p) for p in split.train])
            good_flags = [x["sample_id"] for x in model.manifest["suspect_samples"]]
            n_scored = len(model.manifest["sample_scores"]["ok"])
            bad = [p for p, label, _ in split.test if label][:5]
            caught = []
            for p in bad:
                rep = model.fit_ok([sample(p)])
                caught.append(bool(set(rep["added"]) & {x["sample_id"] for x in rep["suspect_samples"]}))
                lifecycle.delete_samples(model, rep["added"], "bench: undo")
            out.append({"dataset": split.name, "ok_scored": n_scored, "good_flagged": len(good_flags),
                        "defects_slipped_in": len(bad), "defects_flagged": sum(caught), "per_defect": caught})
            print(json.dumps(out[-1]), file=sys.stderr)
    print(json.dumps({"suspect_z": lifecycle.LifecycleSettings().suspect_z, "results": out}, indent=1))


if __name__ == "__main__":
    main()
