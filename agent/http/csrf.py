"""Cross-site protection of the operator page's posts (POST /label, POST /ui/threshold).

A browser sends the operator's Basic credentials (or nothing, with no token) with any request to the
agent, also one that a page on another site makes it send: a plain HTML form posted there would label
samples or set the threshold. So a post that comes from a browser must show it comes from the page:

1. `Sec-Fetch-Site` (every current browser sends it) is `same-origin` or `none` (typed / bookmarked);
2. `Origin`, when sent, names this agent's own host and port (the `Host` header);
3. the form carries the page's CSRF token, equal to the `aa_csrf` cookie the page set (a double-submit
   token: a random value per browser session, `SameSite=Strict`, `HttpOnly`), which another site can
   neither read nor send.

Requests with `Authorization: Bearer` are API clients (a browser never adds that header on its own) and
are only checked by the token, as every other endpoint. A non-browser client without a token (loopback
default) sends none of the browser headers and is not refused either: only a browser can be misused by a
third-party page. Every refusal is 403 with code `cross_site` or `csrf` and logged at WARNING.
"""

from __future__ import annotations

import hmac
import re
import secrets
from urllib.parse import urlsplit

from fastapi import Request, Response

from agent.http.errors import ApiError

COOKIE = "aa_csrf"
FIELD = "csrf"
_TOKEN = re.compile(r"\A[0-9a-f]{32}\Z")
SAME_SITE = ("same-origin", "none")


def page_token(request: Request) -> str:
    """The browser's token: its cookie when it has a well-formed one, else a new random one."""
    have = request.cookies.get(COOKIE, "")
    return have if _TOKEN.match(have) else secrets.token_hex(16)


def set_token(response: Response, token: str, secure: bool) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure, path="/")


def _is_browser(request: Request) -> bool:
    h = request.headers
    auth = h.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return False
    return any(k in h for k in ("sec-fetch-site", "origin", "referer", "cookie")) or auth[:6].lower() == "basic "


def check_page_post(request: Request, form_token: str | None) -> None:
    """ApiError 403 unless this post comes from the agent's own page (or from an API client, see above)."""
    h = request.headers
    site = h.get("sec-fetch-site")
    if site is not None and site not in SAME_SITE:
        raise ApiError("cross_site", f"refused: a {site[:20]} request (Sec-Fetch-Site); the operator page's "
                                     "forms only work from the page itself")
    origin = h.get("origin")
    if origin is not None and origin != "null":
        if urlsplit(origin).netloc.lower() != h.get("host", "").lower():
            raise ApiError("cross_site", f"refused: posted from another origin ({origin[:80]!r}); the operator "
                                         "page's forms only work from the page itself")
    elif origin == "null":
        raise ApiError("cross_site", "refused: posted from an opaque origin (Origin: null)")
    if not _is_browser(request):
        return
    cookie = request.cookies.get(COOKIE, "")
    if not (form_token and _TOKEN.match(cookie) and hmac.compare_digest(form_token, cookie)):
        raise ApiError("csrf", "refused: the form's CSRF token is missing or does not match this browser's "
                               "session; reload the operator page and try again")
