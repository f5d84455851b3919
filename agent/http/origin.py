"""Where a request may come from: one rule for the whole API, applied by the guard before any route runs.

1. **Host allow-list** (every request but /health): the `Host` header must name this agent: an IP
   literal, `localhost`, the configured `http.host`, the machine's host name (also `<name>.local`), or
   one of `http.allowed_hosts` (`"*"`: any). A DNS-rebinding page reaches the agent under its own domain
   name, which is on no list, so it gets nothing, not even the page's cookie and token.
2. **Same origin for every change of state** (POST, PUT, PATCH, DELETE): a request that a browser sent
   (it carries `Sec-Fetch-Site`, `Origin` or a `Referer`) must come from the agent's own pages:
   `Sec-Fetch-Site` is `same-origin` or `none` (typed, bookmarked), `Origin` (when sent) is the agent's
   own scheme-less host and port, and a `Referer` without the other two names the agent's own host.
   An API client (curl, a PLC gateway, Node-RED) sends none of these headers and passes as before (with
   the bearer token when one is configured). The operator page's own forms also carry a double-submit
   token (agent/http/csrf.py).

Every refusal is 403 (`host_not_allowed`, `cross_site`), logged at WARNING by the guard, and nothing runs.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAME_ORIGIN = ("same-origin", "none")
ANY_HOST = "*"


def _bare(host: str) -> str:
    """A host header's or URL's host part, lower case, without port, brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostRule:
    """The names this agent answers to (see the module's doc)."""

    def __init__(self, configured_host: str, allowed: Iterable[str] = ()) -> None:
        names = {"localhost", _bare(configured_host)}
        try:
            name = socket.gethostname().lower()
        except OSError:
            name = ""
        if name:
            names |= {name, f"{name}.local", name.split(".", 1)[0]}
        extra = [a.strip().lower() for a in allowed]
        self.any = ANY_HOST in extra
        self.names = frozenset(n for n in names | {_bare(a) for a in extra if a != ANY_HOST} if n)

    def allows(self, host_header: str | None) -> bool:
        if self.any:
            return True
        if not host_header:
            return False  # HTTP/1.1 requires it; a request without one names nobody
        host = _bare(host_header)
        return _is_ip(host) or host in self.names


def cross_site_reason(method: str, headers: dict[bytes, bytes]) -> str | None:
    """Why a state-changing browser request is not from the agent's own origin (None: it is, or it is no
    browser request, or it changes nothing)."""
    if method.upper() not in UNSAFE_METHODS:
        return None

    def get(name: bytes) -> str | None:
        v = headers.get(name)
        return v.decode("latin-1") if v is not None else None

    host = (get(b"host") or "").strip().lower()
    site = get(b"sec-fetch-site")
    if site is not None and site.strip().lower() not in SAME_ORIGIN:
        return f"a {site[:20]!r} request (Sec-Fetch-Site): the agent changes a model only from its own pages or an " \
               "API client"
    origin = get(b"origin")
    if origin is not None:
        if origin.strip() == "null":
            return "posted from an opaque origin (Origin: null)"
        if urlsplit(origin.strip()).netloc.lower() != host:
            return f"posted from another origin ({origin[:80]!r}, this agent is {host[:80]!r})"
        return None
    referer = get(b"referer")
    if site is None and referer:
        if urlsplit(referer.strip()).netloc.lower() != host:
            return f"sent from another site's page (Referer {referer[:80]!r})"
    return None
