#!/bin/bash
# The speed issue's checks through the CLI, on the idle machine:
#   tiles: 100 magnetic-tile OK images fitted, the last 30 predicted: p50 inference_ms / p50 timings_ms.backbone
#   plain / heat: 20 real tire images upscaled to 2048x1536 JPEG (quality 92) fitted, 30 predicted (15 good,
#   15 cut), without and with a heatmap: p50 (decode + inference) / p50 backbone (decode is part of inference_ms)
# Usage: bench/cli_check.sh [certified|exact] > out.json   (knn_search of the run; default certified)
set -euo pipefail
cd "$(dirname "$0")/.."
SEARCH=${1:-certified}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SHARED=$(.venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); from datasets import shared_root; print(shared_root())")
export ANOMALY_AGENT_DEFAULTS__KNN_SEARCH=$SEARCH
.venv/bin/python - "$SHARED" "$WORK" <<'PY'
import sys, cv2
from pathlib import Path
shared, work = Path(sys.argv[1]), Path(sys.argv[2])
tire = shared / "datasets" / "mvtec_3d_ad" / "tire"
sets = {"fit": sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:20],
        "pred": sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:15] + sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[:15]}
for tag, paths in sets.items():
    for i, p in enumerate(paths):
        big = cv2.resize(cv2.imread(str(p)), (2048, 1536), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(work / f"{tag}_{i:02d}.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 92])
PY
TILES="$SHARED/datasets/magnetic_tile/MT_Free/Imgs"
mapfile -t ALL < <(ls "$TILES"/*.jpg | sort)
A=(.venv/bin/python -m agent.cli --log-level WARNING --data-root "$WORK/tiles" --backbone efficientnet_lite0)
"${A[@]}" fit --quiet --role r --roi t "${ALL[@]:0:100}" > /dev/null
"${A[@]}" predict --role r --roi t "${ALL[@]: -30}" > "$WORK/tiles.jsonl"
A=(.venv/bin/python -m agent.cli --log-level WARNING --data-root "$WORK/jpeg" --backbone efficientnet_lite0)
"${A[@]}" fit --quiet --role r --roi t "$WORK"/fit_*.jpg > /dev/null
"${A[@]}" predict --role r --roi t "$WORK"/pred_*.jpg > "$WORK/plain.jsonl"
"${A[@]}" predict --role r --roi t --heatmap-dir "$WORK/heat" "$WORK"/pred_*.jpg > "$WORK/heat.jsonl"
.venv/bin/python - "$WORK" "$SEARCH" <<'PY'
import json, statistics as st, sys
work, search = sys.argv[1], sys.argv[2]
out = {"knn_search": search}
for name in ("tiles", "plain", "heat"):
    rows = [json.loads(line) for line in open(f"{work}/{name}.jsonl")]
    d = [r.get("data", r) for r in rows]  # the CLI prints the data of each result
    bb = st.median(x["timings_ms"]["backbone"] for x in d)
    inf = st.median(x["inference_ms"] for x in d)
    out[name] = {"p50_inference_ms": round(inf, 1), "p50_backbone_ms": round(bb, 1), "ratio": round(inf / bb, 2),
                 "parts_p50_ms": {k: round(st.median(x["timings_ms"][k] for x in d), 1) for k in d[0]["timings_ms"]},
                 "anomalies": sum(x["is_anomaly"] for x in d), "scores": [round(x["score"], 6) for x in d]}
print(json.dumps(out, indent=1))
PY
