"""A line trial through the CLI, as a new user runs one (issue 34): defect kinds the ROI never had.

    .venv/bin/python bench/line_trial.py > docs/results/line_trial.json

Per trial: `--ok` good parts fitted (`fit`), then 20 new good parts and 10 + 10 defects of two classes
predicted (`predict`); then 10 NG samples (5 + 5 of those two classes, other images) sent one at a time
(`calibrate`, each a fresh process as a station's operator would), the threshold, the views and the
ng_rank form recorded after each; then 10 further good parts and 10 further defects predicted; finally one
OK sample deleted (`samples --delete`) and the threshold's move recorded. Every pair of defect classes of
magnetic tile and two of tire are trials; the images of a trial never overlap.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import shared_root  # noqa: E402
from eval import commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cli(root: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "agent.cli", "--log-level", "WARNING", "--data-root", str(root),
           "--backbone", "efficientnet_lite0", *args]
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def state(root: Path) -> dict:
    return next(json.loads(line) for line in cli(root, "models").splitlines() if line.strip())


def flagged(root: Path, paths: list[Path]) -> list[bool]:
    out = [json.loads(line) for line in cli(root, "predict", "--role", "r", "--roi", "t", *map(str, paths))
           .splitlines() if line.strip()]
    return [bool(r["is_anomaly"]) for r in out]


def trial(tmp: Path, name: str, good: list[Path], classes: dict[str, list[Path]], n_ok: int) -> dict:
    a, b = classes.values()
    root = tmp / name
    cli(root, "fit", "--quiet", "--role", "r", "--roi", "t", *map(str, good[:n_ok]))
    first_good, later_good = good[n_ok : n_ok + 20], good[n_ok + 20 : n_ok + 30]
    first_bad, ng, later_bad = a[:10] + b[:10], a[10:15] + b[10:15], a[15:20] + b[15:20]
    fg, fb = flagged(root, first_good), flagged(root, first_bad)
    s0 = state(root)
    steps = []
    for p in ng:
        st = json.loads(cli(root, "calibrate", "--role", "r", "--roi", "t", str(p)))
        steps.append({"threshold": round(st["threshold"], 4), "views": (st.get("fusion") or {}).get("active"),
                      "ng_rank": (st.get("ng_rank") or {}).get("form"), "method": st["threshold_method"]})
    lg, lb = flagged(root, later_good), flagged(root, later_bad)
    s1 = state(root)
    ok_ids = [json.loads(line)["sample_id"] for line in cli(root, "samples", "--role", "r", "--roi", "t")
              .splitlines() if line.strip() and json.loads(line).get("kind") == "ok"]
    cli(root, "samples", "--role", "r", "--roi", "t", "--delete", ok_ids[0])
    s2 = state(root)
    return {"trial": name, "classes": list(classes), "ok_fitted": n_ok,
            "ok_only": {"defects_flagged": sum(fb), "defects": len(fb), "good_rejected": sum(fg), "good": len(fg),
                        "per_class_flagged": [sum(fb[:10]), sum(fb[10:])], "threshold": s0["threshold"],
                        "views": (s0.get("fusion") or {}).get("active")},
            "ng_steps": steps,
            "after_ng": {"defects_flagged": sum(lb), "defects": len(lb), "good_rejected": sum(lg), "good": len(lg),
                         "threshold": s1["threshold"], "warnings": [w["code"] for w in s1.get("warnings", [])],
                         "views": (s1.get("fusion") or {}).get("active"), "ng_rank": (s1.get("ng_rank") or {})
                         .get("form")},
            "threshold_changes": sum(1 for x, y in itertools.pairwise(steps) if x["threshold"] != y["threshold"]),
            "view_changes": sum(1 for x, y in itertools.pairwise(steps) if x["views"] != y["views"]),
            "form_changes": sum(1 for x, y in itertools.pairwise(steps) if x["ng_rank"] != y["ng_rank"]),
            "delete_one_ok": {"before": s1["threshold"], "after": s2["threshold"],
                              "relative_move": round(abs(s2["threshold"] - s1["threshold"]) / s1["threshold"], 4)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ok", type=int, default=30)
    args = ap.parse_args()
    base = shared_root() / "datasets"
    tile = base / "magnetic_tile"
    tile_good = sorted((tile / "MT_Free" / "Imgs").glob("*.jpg"))
    tile_cls = {c: sorted((tile / c / "Imgs").glob("*.jpg")) for c in ("MT_Blowhole", "MT_Break", "MT_Crack")}
    tire = base / "mvtec_3d_ad" / "tire"
    tire_good = sorted((tire / "train" / "good" / "rgb").glob("*.png")) + sorted(
        (tire / "test" / "good" / "rgb").glob("*.png"))
    tire_cls = {c: sorted((tire / "test" / c / "rgb").glob("*.png")) for c in ("combined", "contamination", "cut",
                                                                               "hole")}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in itertools.combinations(tile_cls, 2):
            runs.append(trial(Path(tmp), "tile-" + "-".join(pair), tile_good, {c: tile_cls[c] for c in pair}, args.ok))
            print(json.dumps(runs[-1]), file=sys.stderr)
        for pair in (("cut", "contamination"), ("hole", "cut")):
            runs.append(trial(Path(tmp), "tire-" + "-".join(pair), tire_good, {c: tire_cls[c] for c in pair}, args.ok))
            print(json.dumps(runs[-1]), file=sys.stderr)
    print(json.dumps({"commit": commit(), "command": "bench/line_trial.py " + " ".join(sys.argv[1:]),
                      "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
