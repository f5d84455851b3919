"""The issue-27 scenario through the CLI, as an integrator runs it: OK tiles fitted, NG tiles sent with
`calibrate`, held-out good and defective tiles predicted before and after, with `ng_rank: auto` (shipped) and
`off` (NG samples move only the threshold).

    .venv/bin/python bench/cli_calibrate.py > docs/results/cli_calibrate.json

Magnetic tile (../shared): `--ok` OK tiles (the first sorted `MT_Free`), 3 NG tiles per defect class for
`calibrate` (the first of each class), and a held-out set of the last 20 `MT_Free` tiles (another capture
batch than the first ones) and 10 defects of each class taken from the end of each class. Reported: defects
flagged and good tiles rejected at the ROI's threshold, image AUROC over the held-out set, and how many
defects score below the highest-scoring good tile, before and after `calibrate`, plus the ROI's `ng_rank`
state. Each `agent.cli` call is a fresh process (model loaded from disk, as in production).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import shared_root  # noqa: E402
from eval import commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack")


def cli(root: Path, ng_rank: str, *args: str) -> str:
    env = {**os.environ, "ANOMALY_AGENT_DEFAULTS__NG_RANK": ng_rank}
    cmd = [sys.executable, "-m", "agent.cli", "--log-level", "WARNING", "--data-root", str(root),
           "--backbone", "efficientnet_lite0", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout


def predicted(root: Path, ng_rank: str, paths: list[Path], labels: np.ndarray) -> dict:
    rows = [json.loads(line) for line in cli(root, ng_rank, "predict", "--role", "r", "--roi", "t",
                                              *map(str, paths)).splitlines() if line.strip()]
    scores = np.array([r["score"] for r in rows])
    flagged = np.array([r["is_anomaly"] for r in rows])
    return {"defects_flagged": int(flagged[labels == 1].sum()), "defects": int((labels == 1).sum()),
            "good_rejected": int(flagged[labels == 0].sum()), "good": int((labels == 0).sum()),
            "auroc": round(float(roc_auc_score(labels, scores)), 4),
            "defects_below_best_good": int((scores[labels == 1] <= scores[labels == 0].max()).sum()),
            "threshold": rows[0]["threshold"]}


def scenario(tmp: Path, ng_rank: str, n_ok: int) -> dict:
    base = shared_root() / "datasets" / "magnetic_tile"
    free = sorted((base / "MT_Free" / "Imgs").glob("*.jpg"))
    per_class = {c: sorted((base / c / "Imgs").glob("*.jpg")) for c in CLASSES}
    ng = [p for c in CLASSES for p in per_class[c][:3]]
    held = free[-20:] + [p for c in CLASSES for p in per_class[c][-10:]]
    labels = np.r_[np.zeros(20), np.ones(10 * len(CLASSES))].astype(int)
    root = tmp / f"{ng_rank}-{n_ok}"
    cli(root, ng_rank, "fit", "--quiet", "--role", "r", "--roi", "t", *map(str, free[:n_ok]))
    before = predicted(root, ng_rank, held, labels)
    state = json.loads(cli(root, ng_rank, "calibrate", "--role", "r", "--roi", "t", *map(str, ng)))
    after = predicted(root, ng_rank, held, labels)
    return {"ng_rank": ng_rank, "ok_fitted": n_ok, "ng_sent": len(ng), "before_calibrate": before,
            "after_calibrate": after, "roi_ng_rank": state.get("ng_rank"), "warnings": state.get("warnings")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ok", type=int, nargs="+", default=[20, 30])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [scenario(Path(tmp), mode, n) for n in a.ok for mode in ("off", "auto")]
    print(json.dumps({"commit": commit(), "command": "bench/cli_calibrate.py " + " ".join(sys.argv[1:]),
                      "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
