"""CPU and CUDA agree: the same real images fitted and scored on both give the same ranking (Spearman >=
0.999) and scores within 1e-3 relative. Runs only where CUDA exists (CI has no GPU: the one skip allowed
besides Node-RED); bench/gpu.py measures the speed there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from core.backbones import get_extractor
from core.image_io import decode_image
from core.roi.model import RoiModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cpu_and_cuda_give_the_same_scores(tmp_path: Path, tire: Path) -> None:
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:10]
    probes = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:5] + \
        sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[:5]
    scores = {}
    for device in ("cpu", "cuda"):
        ex = get_extractor("efficientnet_lite0", resolution=320, device=device)
        model = RoiModel(tmp_path / device, "st", "tire", ex)
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in train])
        scores[device] = np.array([model.predict([decode_image(p.read_bytes())])[0].score for p in probes])
    rho = spearmanr(scores["cpu"], scores["cuda"]).statistic
    rel = np.max(np.abs(scores["cpu"] - scores["cuda"]) / scores["cpu"])
    print(f"CPU/CUDA: Spearman {rho:.5f}, max relative difference {rel:.2e}")
    assert rho >= 0.999 and rel < 1e-3, (rho, rel)
