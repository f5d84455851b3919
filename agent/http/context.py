"""What every HTTP handler needs, in one object of its own module (so that the routers, the guard and the
error answers import it without importing the app that imports them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.config import AgentConfig
from agent.intake import Intake
from agent.metrics import Metrics
from agent.operator.recent import RecentResults
from agent.runtime import Runtime
from agent.worker import Worker


@dataclass
class HttpContext:
    cfg: AgentConfig
    worker: Worker
    rt: Runtime
    started: float
    metrics: Metrics
    recent: RecentResults
    intake: Intake
    token: str | None = None
    agent_id: str = "anomaly-agent"
    extra_health: Callable[[], dict] | None = None
    accepting: bool = True
