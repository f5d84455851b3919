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


SYNTHETIC_USED: list[str] = []  # test ids that ran on tests/synthetic.py's images instead of the real ones
REAL_SKIPPED: list[str] = []  # test ids skipped because they need the real images


def _real_or_none() -> Path | None:
    root = shared_root()
    return root if (root / "datasets").is_dir() else None


@pytest.fixture(scope="session")
def real_shared() -> Path:
    """../shared (or $ANOMALY_SHARED_DIR) with the real datasets, for assertions that only real images
    support. Missing: a failure under CI=true, a skip elsewhere (counted in the run's last lines)."""
    root = _real_or_none()
    if root is None:
        msg = f"real datasets not found at {shared_root()} (set ANOMALY_SHARED_DIR; see docs/datasets.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """The datasets root: ../shared when it is there; otherwise (never under CI=true, where its absence
    fails) the generated stand-in of tests/synthetic.py in the same layout, so a clone without the real
    images still tests fitting, scoring, thresholds, regions, the lifecycle and every ingress."""
    root = _real_or_none()
    if root is not None:
        return root
    if os.environ.get("CI") == "true":
        pytest.fail(f"shared assets not found at {shared_root()} (under CI=true a missing prerequisite is a "
                    "failure)")
    from tests.synthetic import make_shared

    return make_shared(tmp_path_factory.mktemp("synthetic_shared"))


E2E_FIXTURES = {"data_root", "fitted_template", "broker", "private_systemd_ok"}
E2E_WORDS = ("Agent(", "subprocess", "Broker(", "Chromium", "PrivateSystemd", "soak(", "agent.cli")


def pytest_collection_modifyitems(items) -> None:
    """`e2e`: a test that runs real processes (the agent, the CLI, Mosquitto, Chromium, systemd, Node-RED);
    `pytest -m "not e2e"` runs the rest, the unit level, in about a minute."""
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            src = ""
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())) or any(w in src for w in E2E_WORDS):
            item.add_marker(pytest.mark.e2e)


def pytest_runtest_setup(item) -> None:
    if "shared" in getattr(item, "fixturenames", ()) and _real_or_none() is None:
        SYNTHETIC_USED.append(item.nodeid)


def pytest_runtest_logreport(report) -> None:
    if report.skipped and "real datasets not found" in str(report.longrepr):
        REAL_SKIPPED.append(report.nodeid)


def pytest_unconfigure(config) -> None:
    """The run's last line (after pytest's own "N passed"): how much of the run did not see real images, and
    where to get them."""
    terminalreporter = config.pluginmanager.get_plugin("terminalreporter")
    if not (SYNTHETIC_USED or REAL_SKIPPED) or terminalreporter is None:
        return
    terminalreporter.write_line(
        f"real images: not found at {shared_root()}; {len(set(SYNTHETIC_USED))} tests ran on synthetic images "
        f"(tests/synthetic.py) and {len(set(REAL_SKIPPED))} that need the real ones were skipped. Get them: "
        "docs/datasets.md, then set ANOMALY_SHARED_DIR.", yellow=True, bold=True)


@pytest.fixture(scope="session")
def tire(shared: Path) -> Path:
    return shared / "datasets" / "mvtec_3d_ad" / "tire"


@pytest.fixture(scope="session")
def real_tire(real_shared: Path) -> Path:
    """The real tire images only: for tests whose figures (drift steps under brightening) follow from the
    real images' statistics and would not carry over to the synthetic stand-in."""
    return real_shared / "datasets" / "mvtec_3d_ad" / "tire"


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
