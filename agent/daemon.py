"""`anomaly-agent run`: warm the model, start the worker and the ingestion, serve until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from agent.config import AgentConfig, ConfigError
from agent.control.lock import DataRootLock
from agent.control.server import ControlServer
from agent.debug_heatmaps import DebugHeatmaps
from agent.intake import Intake
from agent.outputs import Service
from agent.process.limits import open_file_budget
from agent.runtime import Runtime
from agent.worker import Worker

log = logging.getLogger(__name__)
PREVIEW_PX = 256  # side of the thumbnails kept for the operator page's heatmaps
LOCK_WAIT_S = 90.0  # a CLI command holding the data root at start: waited for this long

if TYPE_CHECKING:
    from agent.opcua.server import OpcUaSink


class Notifier:
    """systemd notify protocol (READY, WATCHDOG, STATUS, STOPPING); silent without NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self._n = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval = int(usec) / 2e6 if usec and usec.isdigit() else None
        self._last = 0.0

    def send(self, msg: str) -> None:
        if self._n is not None:
            self._n.notify(msg)

    def ping(self) -> None:
        """Called from the worker loop: a hung worker stops the pings and systemd restarts us."""
        if self.interval is not None and time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.send("WATCHDOG=1")


class Heartbeat:
    """Called from the worker loop: pings the systemd watchdog, but not while an intake thread is dead, so
    that systemd restarts an agent that can no longer take inputs (a hung worker stops calling it)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.worker: Worker | None = None
        self._told = False

    def __call__(self) -> None:
        dead = self.worker.dead_intakes() if self.worker is not None else []
        if dead:
            if not self._told:
                log.error("intake thread(s) %s stopped: health is degraded and the watchdog pings stop",
                          ", ".join(dead))
                self._told = True
            return
        self.notifier.ping()


def wire(cfg: AgentConfig, worker: Worker, rt: Runtime, started: float) -> list[Service]:
    """The one place that connects the parts: every enabled ingress and output, the worker's observers
    (metrics, the operator page's recent results) and listeners (every output hears every state change).
    Returns what `serve` starts and stops, in order (outputs before the ingresses that feed them)."""
    intake = Intake(worker)
    outputs = intake.outputs
    worker.add_state_listener(outputs.state)
    parts: list[Service] = []
    mqtt_ingest = None
    if cfg.mqtt.enabled:
        from agent.mqtt.ingest import MqttIngest

        mqtt_ingest = MqttIngest(cfg, intake, rt, started)
        outputs.add(mqtt_ingest)  # folder and HTTP results reach MQTT subscribers (a PLC) too, once per result
        parts.append(mqtt_ingest)
    if cfg.opcua.enabled:
        sink = opcua_sink(cfg, worker, rt, started)
        outputs.add(sink)
        parts.append(sink)
    if cfg.folder.enabled:
        from agent.folder.ingest import FolderIngest

        parts.append(FolderIngest(cfg, intake))
    if cfg.http.enabled:
        from agent.http.server import HttpIngest
        from agent.metrics import Metrics
        from agent.operator.recent import RecentResults

        metrics = Metrics(rt, worker, cfg.data_root)
        recent = RecentResults(cfg.http.recent_results, cfg.data_root / "recent")
        worker.observers += [metrics.observe, recent.observe]
        intake.refusal_observers.append(metrics.rejected)  # folder and MQTT refusals are counted too
        if recent.enabled:
            worker.preview_px = PREVIEW_PX
        spool = mqtt_ingest.spool if mqtt_ingest is not None else None
        outbox = (lambda: {"outbox": len(spool.outgoing())}) if spool is not None else None
        parts.append(HttpIngest(cfg, intake, rt, started, metrics, recent, extra_health=outbox))
    if parts:  # the CLI's changes to this data root come through here (agent/control/server.py)
        parts.append(ControlServer(cfg.data_root, intake, cfg.limits.max_bytes))
    return parts


def opcua_sink(cfg: AgentConfig, worker: Worker, rt: Runtime, started: float) -> OpcUaSink:
    """The OPC UA server: an output (every result of any ingress, every state change)."""
    from agent.health import health_body
    from agent.opcua.server import OpcUaSink
    from core.roi.manifest import unusable_rois
    from core.roi.model import stored_rois

    def states() -> list[dict]:
        return [s for _, s in stored_rois(cfg.data_root)] + unusable_rois(cfg.data_root)

    sink = OpcUaSink(cfg, lambda: health_body(rt, worker, started, cfg.mqtt.client_id), states)
    worker.watch("opcua", sink.thread)
    return sink


def serve(cfg: AgentConfig, notifier: Notifier, worker: Worker, transports: list[Service]) -> int:
    """Start the transports, serve until SIGTERM/SIGINT, then stop intake, drain the worker, close."""
    started: list[Service] = []
    listeners = {k: getattr(cfg, k).max_connections for k in ("http", "opcua") if getattr(cfg, k).enabled}
    try:
        log.info("%s", open_file_budget(listeners)[1])
    except ValueError as exc:
        log.error("%s", exc)
        worker.stop(drain=False, timeout=5)
        return 2
    try:
        for t in transports:
            t.start()
            started.append(t)
    except (RuntimeError, ConfigError) as exc:  # a port in use is the config's (exit 2, naming the key)
        log.error("%s", exc)
        for t in started:  # only what started: the rest has no thread to stop
            t.stop()
        worker.stop(drain=False, timeout=5)
        return 2 if isinstance(exc, ConfigError) else 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping intake, finishing queued work", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ex = worker.rt.extractor
    notifier.send(f"READY=1\nSTATUS=serving on {ex.name} ({ex.device})")
    log.info("anomaly-agent ready: backbone %s on %s, folder=%s, mqtt=%s, http=%s, opcua=%s", ex.name, ex.device,
             cfg.folder.enabled, cfg.mqtt.enabled, cfg.http.enabled, cfg.opcua.enabled)
    while not stop.wait(1.0):
        pass
    notifier.send("STOPPING=1")
    worker.intakes.clear()  # intake threads end now by design
    for t in transports:  # stop intake first
        t.stop()
    worker.stop(drain=True)
    for t in reversed(transports):  # ingresses first, then the outputs they feed
        t.close()  # e.g. MQTT: flush the outbox, publish offline
    log.info("stopped cleanly")
    return 0


def run_daemon(cfg: AgentConfig) -> int:
    # samples, models and results are product data: never readable by other users (the unit's UMask too)
    os.umask(os.umask(0) | 0o027)
    notifier = Notifier()
    lock = DataRootLock(cfg.data_root, "daemon")  # one writer per data root (agent/control/lock.py)
    if not lock.acquire() and (lock.holder().get("owner") != "cli" or not lock.acquire(LOCK_WAIT_S)):
        # another daemon: refused at once; a CLI command that holds it for a moment: waited for
        holder = lock.holder()
        log.error("data root %s is held by %s (pid %s) since %s: one anomaly-agent per data root", cfg.data_root,
                  holder.get("owner", "another process"), holder.get("pid", "?"), holder.get("since_utc", "?"))
        return 2
    started = time.monotonic()
    heartbeat = Heartbeat(notifier)
    worker = Worker(lambda: Runtime(cfg), cfg.worker, heartbeat=heartbeat)
    heartbeat.worker = worker
    rt = worker.start()  # the worker thread loads and warms the backbone: all compute stays on that thread
    if cfg.debug:
        worker.settings.always_heatmap = True
        worker.observers.append(DebugHeatmaps(cfg.data_root / "debug").observe)
    transports = wire(cfg, worker, rt, started)
    if not transports:
        log.error("nothing to do: enable folder, mqtt and/or http in the config")
        return 2
    return serve(cfg, notifier, worker, transports)
