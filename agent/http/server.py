"""The HTTP ingress as a daemon source: uvicorn serving agent.http.api in a thread of the agent."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import uvicorn

from agent.config import AgentConfig
from agent.http.api import create_app
from agent.http.context import HttpContext
from agent.http.protocol import bounded_protocol
from agent.intake import Intake
from agent.metrics import Metrics
from agent.operator.recent import RecentResults
from agent.runtime import Runtime

log = logging.getLogger(__name__)


class HttpIngest:
    name = "http"

    def __init__(self, cfg: AgentConfig, intake: Intake, rt: Runtime, started: float, metrics: Metrics,
                 recent: RecentResults, extra_health: Callable[[], dict] | None = None) -> None:
        """Builds the app and the server; connects nothing (agent/daemon.py feeds `metrics` and `recent`)."""
        self.cfg = cfg
        worker = intake.worker
        if worker is None:
            raise RuntimeError("the HTTP transport needs the worker")
        self.worker = worker
        h = cfg.http
        self.ctx = HttpContext(cfg, worker, rt, started, metrics, recent, intake, token=h.read_token(),
                               agent_id=cfg.mqtt.client_id, extra_health=extra_health)
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(self.ctx), host=h.host, port=h.port, log_level="warning", access_log=False,
            lifespan="off", timeout_graceful_shutdown=10, server_header=False,
            http=bounded_protocol(h.max_connections, h.header_timeout_s), limit_concurrency=h.max_connections + 1,
            ssl_certfile=str(h.tls.cert) if h.tls else None, ssl_keyfile=str(h.tls.key) if h.tls else None))
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._error: BaseException | None = None
        self.port: int | None = None

    def _serve(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # e.g. a bad certificate; uvicorn exits on a port in use
            self._error = exc

    def start(self) -> None:
        h = self.cfg.http
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            why = (f"{type(self._error).__name__}: {self._error}" if self._error and not isinstance(
                self._error, SystemExit) else "address in use or not available")
            raise RuntimeError(f"http: could not serve on {h.host}:{h.port} ({why})")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.worker.watch("http", self._thread)
        log.info("http: listening on %s://%s:%d (token %s, at most %d connections, headers within %.0f s, docs at "
                 "/docs, operator page at /)", "https" if h.tls else "http", h.host, self.port,
                 "required" if self.ctx.token else "off", h.max_connections, h.header_timeout_s)
        if self.ctx.token is None and h.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("http: serving %s without a token: anyone on the network can fit and calibrate; "
                        "set http.token_file", h.host)


    def stop(self) -> None:
        """Stop intake: new requests get 503 shutting_down; requests already queued still get their answer."""
        self.ctx.accepting = False

    def close(self, timeout: float = 15.0) -> None:
        """After the worker drained: let open responses finish, then stop the server."""
        self.server.should_exit = True
        self._thread.join(timeout=timeout)
