"""Inputs and outputs (agent/outputs.py): every result reaches every output but its origin, a failing output
never keeps a result from the others, and the ingresses' constructors connect nothing (the daemon wires)."""

from __future__ import annotations

from pathlib import Path

from agent.config import load_config
from agent.intake import Intake
from agent.outputs import Outputs
from agent.worker import Worker


class Sink:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail
        self.results: list[tuple[str, str | None]] = []
        self.states: list[str] = []

    def on_result(self, origin: str, result: dict, key: str | None) -> None:
        if self.fail:
            raise RuntimeError("this output is down")
        self.results.append((origin, result["request_id"]))

    def on_state(self, role_id: str, roi_id: str, state: dict) -> None:
        if self.fail:
            raise RuntimeError("this output is down")
        self.states.append(f"{role_id}/{roi_id}")


def test_every_result_reaches_every_output_but_its_origin_and_a_failing_one_stops_none() -> None:
    outputs = Outputs()
    mqtt, broken, opcua = Sink("mqtt"), Sink("broken", fail=True), Sink("opcua")
    for s in (mqtt, broken, opcua):
        outputs.add(s)
    for origin, rid in (("folder", "f1"), ("http", "h1"), ("mqtt", "m1")):
        outputs.result(origin, {"request_id": rid}, None)
    outputs.state("st1", "tire", {})
    assert mqtt.results == [("folder", "f1"), ("http", "h1")]  # its own result it answered itself
    assert opcua.results == [("folder", "f1"), ("http", "h1"), ("mqtt", "m1")]
    assert mqtt.states == opcua.states == ["st1/tire"]


def test_ingress_constructors_connect_nothing(tmp_path: Path) -> None:
    """Building MQTT and HTTP changes neither the worker (observers, state listeners, previews) nor the
    intake's outputs: only agent/daemon.py's `wire` connects them."""
    from agent.http.server import HttpIngest
    from agent.metrics import Metrics
    from agent.mqtt.ingest import MqttIngest
    from agent.operator.recent import RecentResults

    cfg = load_config(None, env={"ANOMALY_AGENT_DATA_ROOT": str(tmp_path / "data"), "ANOMALY_AGENT_HTTP__PORT": "0",
                                 "ANOMALY_AGENT_MQTT__ENABLED": "true"})
    worker = Worker(lambda: None, cfg.worker)  # type: ignore[arg-type, return-value]
    intake = Intake(worker)
    before = (list(worker.observers), list(worker._state_listeners), worker.preview_px)
    MqttIngest(cfg, intake, None, 0.0)  # type: ignore[arg-type]
    metrics = Metrics.__new__(Metrics)  # (its registry needs a runtime; HttpIngest only keeps it)
    HttpIngest(cfg, intake, None, 0.0, metrics, RecentResults(3, tmp_path / "recent"))  # type: ignore[arg-type]
    assert (list(worker.observers), list(worker._state_listeners), worker.preview_px) == before
    assert intake.outputs.sinks == [] and intake.refusal_observers == []
