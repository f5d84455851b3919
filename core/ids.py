"""Validation of role/ROI ids and sample names: outside ids never become paths unchecked."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_id(value: object, kind: str = "id") -> str:
    """Return `value` if it is a safe id (``[A-Za-z0-9_.-]{1,64}``, not '.' or '..'), else raise."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or value in (".", "..") or (
        value.startswith(".")
    ):
        raise InputError(
            f"{kind} {value!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . - "
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
