"""Every benchmark command in docs/benchmarks.md starts: each bench/ script imports against today's modules (one
had imported `core.lifecycle` for three refactors after it moved to core/roi/, unnoticed until it was run)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_each_bench_script_imports(name: str, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(name)
    assert module.__doc__, f"bench/{name}.py says what it measures and how to run it"
    assert hasattr(module, "main") or name in {"datasets", "timing", "image_stats"}, name  # helpers
    sys.modules.pop(name, None)
