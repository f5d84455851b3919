"""Inputs and outputs are separate roles: an ingress (a `Service`: started and stopped by the daemon) takes
requests in and makes jobs (agent/intake.py);
a `ResultSink` receives every result and every state change, whatever the ingress the request came from.

The one fan-out: after a request's origin has answered it (the folder wrote its result file, HTTP sent its
response, MQTT journaled its answer), `Outputs.result` hands the result to every sink but the origin's own
(MQTT publishes folder and HTTP results on the result topic; the OPC UA server shows every result). State
changes (fit, calibrate, drift, a ROI that cannot load) go to every sink. A sink that fails is logged and
the others still get the result. Adding an output: a module implementing `ResultSink`, a config section,
one line in agent/daemon.py.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Service(Protocol):
    """What the daemon starts and stops: every ingress, and an output that runs a server (OPC UA).
    `start` (may raise RuntimeError/ConfigError: the daemon exits with a clear error), `stop` (an ingress
    takes no new requests; queued ones are still answered), `close` (after the worker drained)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class ResultSink(Protocol):
    """An output: told every result once its origin answered it (`key`: a stable id for exactly-once
    publishing across restarts, or None) and every ROI state change."""

    name: str

    def on_result(self, origin: str, result: dict, key: str | None) -> None: ...

    def on_state(self, role_id: str, roi_id: str, state: dict) -> None: ...


class Outputs:
    """The dispatcher: a list of sinks, each told every result (but its own ingress's) and every state."""

    def __init__(self) -> None:
        self.sinks: list[ResultSink] = []

    def add(self, sink: ResultSink) -> None:
        self.sinks.append(sink)

    def result(self, origin: str, result: dict, key: str | None = None) -> None:
        for sink in self.sinks:
            if sink.name == origin:  # the origin answered it itself
                continue
            try:
                sink.on_result(origin, result, key)
            except Exception:
                log.exception("outputs: a %s result could not be handed to %s", origin, sink.name)

    def state(self, role_id: str, roi_id: str, state: dict) -> None:
        for sink in self.sinks:
            try:
                sink.on_state(role_id, roi_id, state)
            except Exception:
                log.exception("outputs: %s/%s state could not be handed to %s", role_id, roi_id, sink.name)
