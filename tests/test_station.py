"""A running station (issue 35): a burst of drops is one change, and the model before each kind of change
stays reachable for a rollback. Real daemon, real folder, real tire images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.agent_proc import ROOT, SHIPPED, Agent, wait_for
from tests.test_daemon import drop

ROLE, ROI = "st1", "tire"


def cli(data_root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """The real CLI on the daemon's data root, with the daemon's settings."""
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(SHIPPED), "--data-root",
                           str(data_root), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def _stop(agent: Agent) -> float:
    """SIGTERM; the seconds between the log's "stopped cleanly" and the process's exit."""
    import signal
    import time

    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    stopped = None
    deadline = time.monotonic() + 120
    while agent.proc.poll() is None and time.monotonic() < deadline:
        if stopped is None and "stopped cleanly" in agent.log.read_text(errors="replace"):
            stopped = time.monotonic()
        time.sleep(0.02)
    assert agent.proc.wait(timeout=5) == 0
    return time.monotonic() - stopped if stopped is not None else 0.0


def _versions(data_root: Path) -> list[int]:
    vdir = data_root / "models" / ROLE / ROI / "versions"
    return sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit()) if vdir.is_dir() else []


def _manifest(data_root: Path) -> dict:
    return json.loads((data_root / "models" / ROLE / ROI / "manifest.json").read_text())


def _results(data_root: Path) -> list[dict]:
    d = data_root / "results" / ROLE / ROI
    return [json.loads(p.read_text()) for p in d.glob("*.json")] if d.is_dir() else []


def test_a_burst_of_drops_is_one_change_and_a_calibration_through_the_folder_can_be_rolled_back(
        tmp_path: Path, tire: Path) -> None:
    data_root = tmp_path / "data"
    agent = Agent(data_root, env={"ANOMALY_AGENT_LIFECYCLE__VERSIONS_KEPT": "3"}).start()
    inbox = data_root / "inbox" / ROLE / ROI
    good = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:12]
    bad = [p for kind in ("cut", "hole") for p in sorted((tire / "test" / kind / "rgb").glob("*.png"))[:3]]
    try:
        for i, p in enumerate(good):  # twelve OK parts dropped at once
            drop(inbox / "fit_ok", f"ok{i:02d}.png", p.read_bytes())
        wait_for(lambda: len(_results(data_root)) == 12, 240, "12 fit_ok results")
        assert all(r["status"] == "ok" for r in _results(data_root)), _results(data_root)
        fitted = _versions(data_root)
        assert 1 <= len(fitted) <= 3, fitted  # one change per burst, not one per file
        log = agent.log.read_text()
        assert log.count("synthetic defects") == 1, log[-3000:]  # one tuning for the burst
        before_ng = _manifest(data_root)
        for i, p in enumerate(bad):  # six NG parts, one at a time: six calibrations
            drop(inbox / "send_ng", f"ng{i}.png", p.read_bytes())
            wait_for(lambda i=i: len(_results(data_root)) == 13 + i, 120, f"NG result {i}")
        after = _versions(data_root)
        assert _manifest(data_root)["version"] >= before_ng["version"] + 2
        assert before_ng["version"] in after, (before_ng["version"], after)  # pinned: the model before NG
        assert len(after) <= 3 + 3, after  # bounded: the last 3 and the last version before each kind
    finally:
        lingered = _stop(agent)
    assert lingered < 2.0, f"the process took {lingered:.1f} s to exit after 'stopped cleanly'"
    listed = cli(data_root, agent.env, "rollback", "--role", ROLE, "--roi", ROI)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    pinned = next(r for r in rows if r["version"] == before_ng["version"])
    assert pinned["pinned"] and pinned["change"] == before_ng["change"] and pinned["samples"]["ng"] == 0
    back = cli(data_root, agent.env, "rollback", "--role", ROLE, "--roi", ROI, "--to", str(before_ng["version"]))
    assert back.returncode == 0, back.stderr
    now = _manifest(data_root)
    assert now["counts"]["ng"] == 0 and abs(now["threshold"]["value"] - before_ng["threshold"]["value"]) < 1e-9


def test_the_cli_changes_a_roi_through_the_running_daemon_and_every_output_follows(tmp_path: Path,
                                                                                     tire: Path) -> None:
    """One writer per data root: while the daemon runs, `fit`, `samples --delete`, `rollback --to` and
    `calibrate` from the real CLI go through it; its next prediction (folder result and OPC UA node) carries
    the new version and threshold. A second daemon on the same data root is refused."""
    import asyncio

    from asyncua import Client, ua

    from tests.broker import free_port

    data_root, port = tmp_path / "data", free_port()
    agent = Agent(data_root, env={"ANOMALY_AGENT_OPCUA__ENABLED": "true", "ANOMALY_AGENT_OPCUA__PORT": str(port),
                                  "ANOMALY_AGENT_OPCUA__HANDSHAKE": "false"}).start()
    inbox = data_root / "inbox" / ROLE / ROI / "predict"
    good = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:9]
    cuts = sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[:5]
    probe = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[0].read_bytes()
    n = iter(range(100))

    def predicted() -> dict:
        name = f"p{next(n)}"
        drop(inbox, f"{name}.png", probe)
        path = data_root / "results" / ROLE / ROI / f"{name}.json"
        wait_for(path.exists, 120, f"result {name}")
        return json.loads(path.read_text())

    async def opcua() -> tuple[int, float]:
        async with Client(f"opc.tcp://127.0.0.1:{port}/anomaly-agent") as client:
            idx = await client.get_namespace_index("urn:anomaly-agent:vision")
            get = lambda name: client.get_node(ua.NodeId(f"Rois/{ROLE}/{ROI}/{name}", idx)).read_value()  # noqa: E731
            return int(await get("ModelVersion")), float(await get("Threshold"))

    def changed(r: subprocess.CompletedProcess) -> dict:
        assert r.returncode == 0, r.stderr
        assert "sent to it" in r.stderr, r.stderr  # went through the daemon, did not write beside it
        return json.loads(r.stdout.splitlines()[-1])

    try:
        fit = changed(cli(data_root, agent.env, "fit", "--quiet", "--role", ROLE, "--roi", ROI, *map(str, good)))
        steps = [fit]
        sid = next(json.loads(line)["sample_id"] for line in cli(
            data_root, agent.env, "samples", "--role", ROLE, "--roi", ROI).stdout.splitlines())
        steps.append(changed(cli(data_root, agent.env, "samples", "--role", ROLE, "--roi", ROI, "--delete", sid)))
        steps.append(changed(cli(data_root, agent.env, "rollback", "--role", ROLE, "--roi", ROI, "--to",
                                 str(fit["model_version"]))))
        steps.append(changed(cli(data_root, agent.env, "calibrate", "--role", ROLE, "--roi", ROI, *map(str, cuts))))
        for i, step in enumerate(steps):
            version = step.get("model_version", step.get("version"))
            if i > 0:  # each a new version of the ROI, applied by the daemon
                assert version == steps[i - 1].get("model_version", steps[i - 1].get("version")) + 1, steps
        res = predicted()
        state = _manifest(data_root)
        assert res["data"]["model_version"] == state["version"] == steps[-1]["model_version"]
        assert abs(res["data"]["threshold"] - state["threshold"]["value"]) < 1e-6 and state["counts"]["ng"] == 5
        node_version, node_threshold = asyncio.run(opcua())
        assert node_version == state["version"] and abs(node_threshold - state["threshold"]["value"]) < 1e-6
        second = Agent(data_root, client_id="second", env={"ANOMALY_AGENT_OPCUA__ENABLED": "false"})
        second.start(wait_ready=False)
        assert second.proc.wait(timeout=120) == 2  # type: ignore[union-attr]
        assert "one anomaly-agent per data root" in second.log.read_text()
    finally:
        agent.sigterm()
    direct = cli(data_root, agent.env, "samples", "--role", ROLE, "--roi", ROI, "--delete", sid)  # no daemon now
    assert "sent to it" not in direct.stderr
