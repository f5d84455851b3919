"""`python -m tests.stall_agent ARGS` = `anomaly-agent ARGS` with a worker that hangs on one ROI.

A test-only entry point, so that the product's worker loop carries no debug hook: the watchdog tests need a
worker that stops making progress the way a deadlocked library call would. `ANOMALY_DEBUG_STALL_ROI` names
the ROI whose first batch never returns; with `ANOMALY_DEBUG_STALL_ONCE` (a file path) it hangs only while
that file does not exist yet (it is created when the hang starts), so a restarted agent gets past it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from agent import cli
from agent.worker import Worker

log = logging.getLogger("tests.stall_agent")
_process = Worker._process


def _stalling_process(self: Worker, batch: list) -> None:
    roi = os.environ.get("ANOMALY_DEBUG_STALL_ROI")
    mark = os.environ.get("ANOMALY_DEBUG_STALL_ONCE")
    if batch and batch[0].roi_id == roi and not (mark and os.path.exists(mark)):
        if mark:
            Path(mark).touch()
        log.warning("test hook: ANOMALY_DEBUG_STALL_ROI=%s: the worker stalls now", roi)
        threading.Event().wait()
    _process(self, batch)


if __name__ == "__main__":
    Worker._process = _stalling_process  # type: ignore[method-assign]
    sys.exit(cli.main(sys.argv[1:]))
