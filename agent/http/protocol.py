"""uvicorn's HTTP/1.1 protocol with the bounds a listener on a factory network needs
(config `http.max_connections`, `http.header_timeout_s`):

- a connection past `max_connections` is closed at once (the process's open files are never the
  attacker's to spend; requests past it on kept connections get uvicorn's 503 via `limit_concurrency`);
- a request's headers must be complete within `header_timeout_s` of the connection (or of the previous
  response on a kept-alive one): a client that sends one header line every few seconds is closed.

Refusals are logged at WARNING at most once a minute (with how many were held back).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.process.backoff import RateLimitedLog

log = logging.getLogger("agent.http.api")
FULL = "http: connection refused, over http.max_connections"
SLOW = "http: connection closed, request headers not complete within http.header_timeout_s"
log.addFilter(RateLimitedLog((FULL, SLOW)))


def bounded_protocol(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class with these bounds (uvicorn.Config(http=...) takes a class)."""

    class Bounded(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("%s (%d): %s", FULL, max_connections, (self.client or ("?",))[0])
                transport.abort()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.warning("%s (%.0f s): %s", SLOW, header_timeout_s, (self.client or ("?",))[0])
                self.transport.abort()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers are complete: it runs under its own limits
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request on this connection gets the same deadline ...
            super().on_response_complete()  # ... (a pipelined one already buffered disarms it here)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Bounded
