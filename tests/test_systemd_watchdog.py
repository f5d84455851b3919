"""A hung worker under a real systemd: the shipped unit's watchdog kills the agent and Restart= brings it
back, and every request dropped before, during and after the hang gets exactly one result."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.agent_proc import ROOT, SHIPPED, folder_completions, wait_for
from tests.conftest import AGENT_ENV_KEYS
from tests.private_systemd import PrivateSystemd, available, service_from_shipped
from tests.test_daemon import drop

UNIT = "anomaly-agent.service"


@pytest.fixture
def private_systemd_ok() -> None:
    why = available()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the systemd watchdog test cannot run: {why}")
        pytest.skip(why)


def results(data_root: Path, roi: str) -> list[dict]:
    d = data_root / "results" / "st1" / roi
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []


def test_systemd_watchdog_restarts_a_hung_worker(private_systemd_ok: None, data_root: Path, tmp_path: Path,
                                                 tire: Path) -> None:
    goods = sorted((tire / "test" / "good" / "rgb").glob("*.png"))
    mark = tmp_path / "stalled-once"
    log = tmp_path / "agent.log"
    stops = tmp_path / "stops.txt"
    env = {**AGENT_ENV_KEYS, "ANOMALY_AGENT_FOLDER__STABLE_S": "0.3", "ANOMALY_AGENT_FOLDER__RESCAN_S": "1",
           "PYTHONUNBUFFERED": "1", "ANOMALY_DEBUG_STALL_ROI": "stall", "ANOMALY_DEBUG_STALL_ONCE": str(mark),
           "PYTHONPATH": str(ROOT)}
    exec_start = f"{sys.executable} -m tests.stall_agent --config {SHIPPED} --data-root {data_root} run"
    unit = service_from_shipped(ROOT / "systemd" / "anomaly-agent.service", exec_start,
                                {"WatchdogSec": "4", "RestartSec": "1", "WorkingDirectory": str(ROOT)}, env, log,
                                stops)
    assert "Restart=on-failure" in unit and "Type=notify" in unit  # what the shipped unit says
    sd = PrivateSystemd(tmp_path / "systemd", {UNIT: unit}).start()
    try:
        wait_for(lambda: sd.pid1() and sd.show(UNIT, "ActiveState").get("ActiveState") == "active", 180,
                 f"{UNIT} active (READY=1 sent)")
        first_pid = sd.show(UNIT, "MainPID")["MainPID"]
        drop(data_root / "inbox" / "st1" / "tire" / "predict", "before.png", goods[0].read_bytes())
        wait_for(lambda: len(results(data_root, "tire")) == 1, 60, "the result of the request before the hang")

        drop(data_root / "inbox" / "st1" / "stall" / "predict", "hang.png", goods[1].read_bytes())
        wait_for(mark.exists, 30, "the worker to stall")
        t_hang = time.monotonic()
        drop(data_root / "inbox" / "st1" / "tire" / "predict", "during.png", goods[2].read_bytes())

        def restarted() -> bool:
            s = sd.show(UNIT, "NRestarts", "MainPID", "ActiveState")
            return int(s.get("NRestarts") or 0) >= 1 and s.get("ActiveState") == "active" and \
                s.get("MainPID") not in ("0", first_pid)
        wait_for(restarted, 180, "systemd to kill the hung agent and start it again")
        took = time.monotonic() - t_hang
        drop(data_root / "inbox" / "st1" / "tire" / "predict", "after.png", goods[3].read_bytes())
        wait_for(lambda: len(results(data_root, "tire")) == 3 and results(data_root, "stall"), 120,
                 "every request answered after the restart")
        time.sleep(2)  # a late duplicate would show now
        tire_results = {r["file"].removesuffix(".png"): r for r in results(data_root, "tire")}
        assert sorted(tire_results) == ["after", "before", "during"], tire_results
        assert folder_completions(data_root, "tire") == {"after.png": 1, "before.png": 1, "during.png": 1}
        assert all(r["status"] == "ok" for r in tire_results.values())
        stalled = results(data_root, "stall")  # the request the worker hung on: answered once after the restart
        assert len(stalled) == 1 and stalled[0]["error"]["code"] == "model_not_fitted", stalled
        verdicts = stops.read_text().split("\n")[0].split()  # systemd's own account of the first stop
        assert verdicts[0] == "watchdog" and verdicts[2] == "ABRT", verdicts  # WatchdogSignal=SIGABRT
        assert took < 4 + 60, took  # WatchdogSec 4 + RestartSec 1 + a start-up
        assert not list((data_root / "processing").rglob("*.png"))
    finally:
        sd.stop()
