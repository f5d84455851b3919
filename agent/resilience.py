"""What keeps the agent up when the machine runs short: the open-file budget read at start, and the
back-off every intake and output thread uses when a step fails with an OSError (EMFILE, ENOSPC, EIO...).

An attacker who opens a thousand sockets, a full disk or a flaky NFS mount must never end a thread: the
thread logs (at most once per interval, with the count), waits a growing delay, and tries again; the
watchdog sees it alive, and /health names the problem through the thread's own checks.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)
# descriptors the agent needs besides its listeners: the broker, model files, samples, logs, torch's own
RESERVED_FDS = 256


class Backoff:
    """Delays after consecutive failures of one loop (0.5 s doubling to 30 s); one WARNING per 60 s."""

    def __init__(self, name: str, first: float = 0.5, longest: float = 30.0, log_every_s: float = 60.0) -> None:
        self.name, self.first, self.longest, self.log_every_s = name, first, longest, log_every_s
        self.failures = 0
        self._delay = 0.0
        self._logged = 0.0
        self._unlogged = 0

    def failed(self, exc: BaseException) -> float:
        """Count a failure; the delay to wait before the next try."""
        self.failures += 1
        self._delay = min(self.longest, self._delay * 2 if self._delay else self.first)
        now = time.monotonic()
        if now - self._logged >= self.log_every_s:
            more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
            log.warning("%s: %s: %s; retrying in %.1f s%s", self.name, type(exc).__name__, exc, self._delay, more)
            self._logged, self._unlogged = now, 0
        else:
            self._unlogged += 1
        return self._delay

    def ok(self) -> None:
        if self.failures:
            log.warning("%s: working again after %d failed tries", self.name, self.failures)
        self.failures, self._delay, self._unlogged = 0, 0.0, 0


class RateLimitedLog(logging.Filter):
    """A logging filter: records whose message starts with one of `prefixes` pass once per interval;
    the next one that passes says how many were held back (a connection flood is one line a minute)."""

    def __init__(self, prefixes: tuple[str, ...], every_s: float = 60.0) -> None:
        super().__init__()
        self.prefixes, self.every_s = prefixes, every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        key = next((p for p in self.prefixes if msg.startswith(p)), None)
        if key is None:
            return True
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        self._last[key] = now
        if held:
            record.msg, record.args = f"{msg} ({held} more like it in the last {self.every_s:.0f} s)", ()
        return True


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
