"""ASGI middleware in front of every endpoint: the token and the request size, before any parsing."""

from __future__ import annotations

import hmac
from base64 import b64decode
from typing import TYPE_CHECKING, Any

from agent.http.errors import refuse
from agent.http.origin import HostRule, cross_site_reason

if TYPE_CHECKING:
    from agent.http.context import HttpContext


def token_ok(header: bytes | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, or Basic with the token as password (a browser's login prompt)."""
    if not header:
        return False
    scheme, _, value = header.decode("latin-1").partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = b64decode(value.strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


# no page of the agent may be framed by another site (clickjacking of the operator page's buttons)
FRAME_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                 (b"x-content-type-options", b"nosniff")]


class Guard:
    """ASGI middleware, before parsing: the Host allow-list and the same-origin rule of state-changing
    requests (agent/http/origin.py), the bearer token (all but /health) and the request size limit."""

    def __init__(self, app: Any, ctx: HttpContext) -> None:
        self.app, self.ctx = app, ctx
        self.hosts = HostRule(ctx.cfg.http.host, ctx.cfg.http.allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refusal = None
            cross = cross_site_reason(scope.get("method", ""), headers)
            host = _header(headers, b"host")
            if scope["path"] != "/health" and not self.hosts.allows(host):
                refusal = ("host_not_allowed", f"refused: Host {(host or '')[:80]!r} is not a name of this agent "
                           "(http.allowed_hosts lists further names)")
            elif cross is not None:
                refusal = ("cross_site", f"refused: {cross}")
            elif self.ctx.token and scope["path"] != "/health" and not token_ok(headers.get(b"authorization"),
                                                                                 self.ctx.token):
                refusal = ("unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'")
            else:
                length = headers.get(b"content-length")
                limit = self.ctx.cfg.http.max_request_bytes
                if length and length.isdigit() and int(length) > limit:
                    refusal = ("payload_too_large", f"request of {int(length)} bytes is over http.max_request_bytes "
                               f"({limit})")
            if refusal:
                await refuse(self.ctx, scope, *refusal)(scope, receive, _framed(send))
                return
            await self._bounded(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _bounded(self, scope: dict, receive: Any, send: Any) -> None:
        """Count the body as it streams (chunked requests have no Content-Length): past the limit, stop
        reading and answer 413 instead of holding the rest."""
        limit = self.ctx.cfg.http.max_request_bytes
        seen, started, over = 0, False, False

        async def counted_receive() -> dict:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            if over:
                return  # the app's own answer to a body cut short (a parse error) is replaced below
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *FRAME_HEADERS]}
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            pass
        if over and not started:
            msg = f"request body over http.max_request_bytes ({limit}): stopped reading at {seen} bytes"
            await refuse(self.ctx, scope, "payload_too_large", msg)(scope, receive, _framed(send))


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    v = headers.get(name)
    return v.decode("latin-1") if v is not None else None


def _framed(send: Any) -> Any:
    """`send` with the frame headers added to the response start (the guard's own refusals too)."""
    async def framed(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *FRAME_HEADERS]}
        await send(message)
    return framed


class _BodyTooLarge(Exception):
    """Raised inside the app's body read when a streamed body passes the limit."""
