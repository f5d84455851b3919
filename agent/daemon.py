"""`anomaly-agent run`: warm the model, start the worker and the ingestion, serve until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .config import AgentConfig
from .runtime import Runtime
from .worker import Worker

log = logging.getLogger(__name__)


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


def run_daemon(cfg: AgentConfig) -> int:
    # samples, models and results are product data: never readable by other users (the unit's UMask too)
    os.umask(os.umask(0) | 0o027)
    notifier = Notifier()
    started = time.monotonic()
    heartbeat = Heartbeat(notifier)
    worker = Worker(lambda: Runtime(cfg), cfg.worker, heartbeat=heartbeat)
    heartbeat.worker = worker
    rt = worker.start()  # the worker thread loads and warms the backbone: all compute stays on that thread
    sources = []
    if cfg.folder.enabled:
        from .folder import FolderIngest

        sources.append(FolderIngest(cfg, worker))
    if cfg.mqtt.enabled:
        from .mqtt import MqttIngest

        mqtt_ingest = MqttIngest(cfg, worker, rt, started)
        for s in sources:
            s.mirror = mqtt_ingest.mirror  # folder results are published on MQTT too
        sources.append(mqtt_ingest)
    if cfg.http.enabled:
        from .http_server import HttpIngest

        outbox = (lambda: {"outbox": len(mqtt_ingest.spool.outgoing())}) if cfg.mqtt.enabled else None
        http_ingest = HttpIngest(cfg, worker, rt, started, extra_health=outbox)
        if cfg.mqtt.enabled:
            http_ingest.ctx.mirror = mqtt_ingest.mirror  # HTTP results reach MQTT subscribers (a PLC) too
        sources.append(http_ingest)
    if not sources:
        log.error("nothing to do: enable folder, mqtt and/or http in the config")
        return 2
    try:
        for s in sources:
            s.start()
    except RuntimeError as exc:
        log.error("%s", exc)
        for s in sources:
            s.stop()
        worker.stop(drain=False, timeout=5)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping intake, finishing queued work", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier.send(f"READY=1\nSTATUS=serving on {rt.extractor.name} ({rt.extractor.device})")
    log.info("anomaly-agent ready: backbone %s on %s, folder=%s, mqtt=%s, http=%s", rt.extractor.name,
             rt.extractor.device, cfg.folder.enabled, cfg.mqtt.enabled, cfg.http.enabled)
    while not stop.wait(1.0):
        pass
    notifier.send("STOPPING=1")
    worker.intakes.clear()  # intake threads end now by design
    for s in sources:  # stop intake first
        s.stop()
    worker.stop(drain=True)
    for s in sources:
        if hasattr(s, "close"):
            s.close()  # e.g. MQTT: flush the outbox, publish offline
    log.info("stopped cleanly")
    return 0
