"""The agent's health report: the same content on MQTT (<base>/health) and HTTP (GET /health).

`status` is "online", or "degraded" when an intake thread has died (the systemd watchdog pings stop
too, so systemd restarts the agent) or an accepted input has waited over `worker.stuck_after_s` for
its answer.
"""

from __future__ import annotations

import time

from agent.runtime import Runtime
from agent.worker import Worker


def health_body(rt: Runtime, worker: Worker, started: float, agent_id: str) -> dict:
    ex = rt.extractor
    dead = worker.dead_intakes()
    oldest = worker.oldest_unanswered_s()
    problems = [f"intake thread {name} has stopped" for name in dead]
    problems += [f"ROI {s['role_id']}/{s['roi_id']} cannot be used: {s['unloadable']['reason']}"
                 for s in rt.unloadable_states()]
    if oldest is not None and oldest > worker.cfg.stuck_after_s:
        problems.append(f"an input has waited {oldest:.0f} s for its answer (worker.stuck_after_s "
                        f"{worker.cfg.stuck_after_s:g})")
    return {"status": "degraded" if problems else "online", "problems": problems, "agent_id": agent_id,
            "queue_depth": worker.depth(), "oldest_unanswered_s": oldest,
            "intake": {name: t.is_alive() for name, t in worker.intakes.items()},
            "loaded_rois": rt.loaded_count(), "device": str(ex.device),
            "backbone": ex.identity.to_dict(), "uptime_s": round(time.monotonic() - started, 1),
            "counts": dict(worker.counts), "last": worker.last_timing}
