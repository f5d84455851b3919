"""The agent's health report: the same content on MQTT (<base>/health) and HTTP (GET /health)."""

from __future__ import annotations

import time

from .runtime import Runtime
from .worker import Worker


def health_body(rt: Runtime, worker: Worker, started: float, agent_id: str) -> dict:
    ex = rt.extractor
    return {"status": "online", "agent_id": agent_id, "queue_depth": worker.depth(), "device": str(ex.device),
            "backbone": ex.identity.to_dict(), "uptime_s": round(time.monotonic() - started, 1),
            "counts": dict(worker.counts), "last": worker.last_timing}
