"""The shipped unit passes `systemd-analyze verify` and keeps the properties docs/deploy.md promises."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "anomaly-agent.service"


def test_unit_declares_notify_watchdog_restart_and_hardening() -> None:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNIT)
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure" and int(svc["WatchdogSec"]) > 0
    assert svc["User"] == "anomaly" and svc["NoNewPrivileges"] == "true" and svc["PrivateTmp"] == "true"
    assert svc["ProtectSystem"] == "strict" and svc["ReadWritePaths"] == "/var/lib/anomaly-agent"
    # the listeners' shipped caps leave room below the unit's open-file limit (issue 33: 1024 was exhausted)
    from agent.config import HttpConfig
    from agent.opcua.config import OpcUaConfig
    from agent.process.limits import RESERVED_FDS

    caps = HttpConfig().max_connections + OpcUaConfig().max_connections
    assert int(svc["LimitNOFILE"]) >= 4 * (caps + RESERVED_FDS)
    assert "ANOMALY_AGENT_DATA_ROOT=/var/lib/anomaly-agent" in svc["Environment"].replace('"', "") or any(
        "ANOMALY_AGENT_DATA_ROOT=/var/lib/anomaly-agent" in line for line in UNIT.read_text().splitlines())


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze missing")
        pytest.skip("systemd-analyze missing")
    exe = Path(sys.executable).with_name("anomaly-agent")
    unit = tmp_path / "anomaly-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/anomaly-agent/.venv/bin/anomaly-agent", str(exe)))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "anomaly-agent.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
