"""The operator page's kept results (agent/operator/recent.py) past their bound: `http.recent_results: 3` and six
predictions leave the three newest, and the images of the evicted ones are gone from disk (the bound holds
for memory and for the disk, not only the list)."""

from __future__ import annotations

from pathlib import Path

from agent.jobs import Job, Outcome, ok_result
from agent.operator.recent import RecentResults


def test_past_its_bound_the_oldest_results_and_their_images_leave(tmp_path: Path) -> None:
    recent = RecentResults(3, tmp_path / "recent")
    for i in range(6):
        job = Job("st1", "tire", "predict", [f"image-{i}".encode()], f"part-{i}")
        recent.observe(job, Outcome(ok_result(job, {"score": 0.1 * i, "is_anomaly": False})))
    assert [r.result["request_id"] for r in recent.items()] == ["part-5", "part-4", "part-3"]
    assert sorted(p.read_bytes() for p in (tmp_path / "recent").iterdir()) == [b"image-3", b"image-4", b"image-5"]
    assert recent.find("part-0") is None and recent.find("part-5") is not None
