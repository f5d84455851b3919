"""The soak benchmark's small CI variant (bench/soak.py runs 10,000): mixed requests through MQTT and the
folder, none lost or duplicated, the agent alive, file descriptors bounded, and the worker's queue (4 here)
driven past its bound by 32 requests in flight: full, never over, and still nothing lost."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_small(tmp_path: Path, tire: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from soak import soak

    out = soak(tmp_path, 300, outstanding=32, queue_size=4, tire=tire)
    assert out["agent_alive"] and out["mqtt_lost"] == 0 and out["folder_lost"] == 0, out
    assert "teardown_error" not in out, out
    assert out["mqtt_duplicated"] == 0 and out["mqtt_answered"] == out["mqtt_sent"], out
    assert out["folder_duplicated"] == 0, out  # counted from the completions log, not the result files
    assert out["fds_after_warmup"]["max"] - out["fds_after_warmup"]["min"] < 20, out
    assert out["queue_depth_max"] == 4, out["queue_depth_max"]  # reached the bound (sampled each second), never past
    assert set(out["errors_by_code"]) <= {"truncated_file", "corrupt_image", "model_not_fitted", "invalid_base64"}, out
