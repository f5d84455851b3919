"""One rule for a missing prerequisite: a failure under CI=true (.ci/run sets it), a skip elsewhere."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(msg: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg} (under CI=true a missing prerequisite is a failure)")
    pytest.skip(msg)
