"""What keeps a thread up when the machine runs short: the back-off every intake and output loop uses
when a step fails with an OSError (EMFILE, ENOSPC, EIO...), and a log filter that makes a flood of
refusals one line a minute. An attacker who opens a thousand sockets, a full disk or a flaky mount
must never end a thread: it logs (at most once per interval, with the count), waits a growing delay,
and tries again; the watchdog sees it alive.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


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
