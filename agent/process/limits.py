"""The process's own limits: the open-file budget read at start (the listeners' caps must leave room for
everything else), and long background work run at a lowered scheduling priority."""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
# descriptors the agent needs besides its listeners: the broker, model files, samples, logs, torch's own
RESERVED_FDS = 256


def open_file_budget(listeners: dict[str, int]) -> tuple[int, str]:
    """The process's open-file limit (its soft limit raised to the hard one when that is higher) and a
    line for the log; ValueError when the listeners' caps leave fewer than RESERVED_FDS for the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    held = sum(listeners.values())
    if soft != resource.RLIM_INFINITY and held + RESERVED_FDS > soft:
        caps = ", ".join(f"{k}.max_connections {v}" for k, v in listeners.items())
        raise ValueError(f"the open-file limit is {soft} and the listeners may hold {held} connections ({caps}); "
                         f"leave at least {RESERVED_FDS} for the rest: lower them or raise LimitNOFILE")
    parts = ", ".join(f"{k} {v}" for k, v in listeners.items()) or "none"
    return soft, f"open files: limit {soft}; listeners capped at {held} connections ({parts})"


def in_low_priority_thread(fn: Callable[..., T], *args: Any, nice: int = 10, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in a new thread whose scheduling priority is lowered by `nice` (Linux: a thread
    is a task of its own; the threads it starts, e.g. torch's, inherit it): long background work (an
    import's embedding) then yields the CPU to the worker's predictions. Returns or raises what fn did."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                            + nice))
        except (OSError, AttributeError):
            pass  # not Linux, or not allowed: the work runs at normal priority
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    t = threading.Thread(target=run, name="low-priority", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
