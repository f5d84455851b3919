"""Debug mode (`debug: true`): every prediction's heatmap written to <data_root>/debug/<role>/<roi>/."""

from __future__ import annotations

from pathlib import Path

from agent.jobs import Job, Outcome
from core.storage import utc_now


class DebugHeatmaps:
    """A worker observer; the worker renders every heatmap while it is attached (`always_heatmap`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def observe(self, job: Job, outcome: Outcome) -> None:
        data = outcome.result.get("data") or {}
        if outcome.heatmap_png is None or job.action != "predict":
            return
        folder = self.root / job.role_id / job.roi_id
        folder.mkdir(parents=True, exist_ok=True)
        stamp = utc_now().replace(":", "").replace("-", "")
        verdict = "NG" if data.get("is_anomaly") else "OK"
        (folder / f"{stamp}_{verdict}_{data.get('score', 0):.4f}.png").write_bytes(outcome.heatmap_png)
