"""Shared fixtures: the real datasets and weights in ../shared, a session-wide real backbone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_proc import STARTED
from tests.broker import Broker

ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("ANOMALY_SHARED_DIR", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared (or $ANOMALY_SHARED_DIR). Missing: a failure under CI=true, a skip elsewhere."""
    root = shared_root()
    if not (root / "datasets").is_dir():
        msg = f"shared assets not found at {root} (set ANOMALY_SHARED_DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def tire(shared: Path) -> Path:
    return shared / "datasets" / "mvtec_3d_ad" / "tire"


@pytest.fixture(scope="session")
def tile(shared: Path) -> Path:
    return shared / "datasets" / "magnetic_tile"


@pytest.fixture(scope="session")
def extractor():
    """Real ImageNet EfficientNet-Lite0 at a reduced resolution (256), so the suite stays fast."""
    from core.backbones import get_extractor

    return get_extractor("efficientnet_lite0", resolution=256, device="cpu")


@pytest.fixture(autouse=True)
def no_agent_left_behind():
    """After every test, pass or fail: no agent subprocess is left running."""
    yield
    while STARTED:
        STARTED.pop().cleanup()


AGENT_ENV_KEYS = {"ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0", "ANOMALY_AGENT_BACKBONE__RESOLUTION": "192",
                  "ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "1000"}


@pytest.fixture(scope="session")
def fitted_template(tmp_path_factory, tire: Path) -> Path:
    """A data root with ROI st1/tire fitted on 6 real OK images (via the CLI, same settings as the agent)."""
    root = tmp_path_factory.mktemp("template") / "data"
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:6]
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(root), "--log-level", "WARNING",
                        "fit", "--role", "st1", "--roi", "tire", "--quiet", *map(str, train)],
                       env={**os.environ, **AGENT_ENV_KEYS}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture
def data_root(tmp_path: Path, fitted_template: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(fitted_template, root)
    return root


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Mosquitto on a free loopback port, stopped after the test."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()
