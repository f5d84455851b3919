"""Validation of role/ROI ids and sample names: outside ids never become paths unchecked."""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import InputError

# \A...\Z, not ^...$: "$" also matches before a final newline, so "roi\n" would pass
ID_PATTERN = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
REQUEST_ID_MAX = 200


def safe_text(value: object, limit: int = REQUEST_ID_MAX) -> str:
    """Text from outside (a request id, a file name, a key) made safe for a file, a log line or a key.

    Lone surrogates (the undecodable bytes of a file name, or a JSON "\\udcff") and control characters
    (newlines, ANSI escapes, NUL) become backslash escapes, so the result always encodes as UTF-8 on one
    line; then it is cut to `limit` characters. The one encoder every ingress uses.
    """
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    text = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                       text)
    return text[:limit]


def request_id_from(value: object) -> str:
    """A request id from outside, encoded by `safe_text`; InputError `invalid_request_id` when it is longer
    than REQUEST_ID_MAX characters (never cut in silence: two long ids cut alike would collide). The
    caller answers the error under `short_request_id(value)`."""
    rid = safe_text(value, limit=REQUEST_ID_MAX + 1)
    if len(rid) > REQUEST_ID_MAX or not rid:
        raise InputError(f"request_id must be 1-{REQUEST_ID_MAX} characters; got {len(str(value))}",
                         code="invalid_request_id")
    return rid


def short_request_id(value: object) -> str:
    """The id an invalid request id is answered under: its first 64 characters, marked as cut."""
    text = safe_text(value, limit=REQUEST_ID_MAX + 1)
    return text if len(text) <= REQUEST_ID_MAX else text[:64] + "...(cut)"


def validate_id(value: object, kind: str = "id") -> str:
    """Return `value` if it is a safe id (``[A-Za-z0-9_.-]{1,64}``, not '.' or '..'), else raise."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or value in (".", "..") or (
        value.startswith(".")
    ):
        shown = safe_text(value if isinstance(value, str) else repr(value), 80)  # a 10k-character id is not echoed
        cut = " (cut)" if len(str(value)) > 80 else ""
        raise InputError(
            f"{kind} {shown!r}{cut} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . - "
            "(not starting with '.')",
            code="invalid_id",
        )
    return value


def safe_join(root: Path, *parts: str) -> Path:
    """Join validated parts under root and check the result cannot escape it."""
    for part in parts:
        validate_id(part, "path component")
    root_resolved = root.resolve()
    path = root_resolved.joinpath(*parts)
    if root_resolved != path and root_resolved not in path.parents:
        raise InputError(f"path {path} escapes {root_resolved}", code="invalid_id")
    return path
