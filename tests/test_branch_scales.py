"""A branch with its own input scale (issue 27: scales as part of a branch): it sees the same image smaller,
in its own forward pass; its grid shrinks with the scale, its identity says where it looks, and a ROI fitted
with it fits, predicts (maps at the image's size) and reloads its banks on real images. What it is worth for
detection is measured in bench/proxy_eval.py (docs/benchmarks.md), not asserted here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.backbones import get_extractor
from core.image_io import decode_image
from core.roi.model import ModelSettings, RoiModel


def test_a_scaled_branch_has_its_own_pass_grid_and_identity() -> None:
    ex = get_extractor("efficientnet_lite0", resolution=256, branches=((4, 10), (10, 14), (10, 14)),
                       scales=(1.0, 1.0, 0.5))
    ids = [i.to_dict() for i in ex.branch_identities]
    assert [i["resolution"] for i in ids] == [256, 256, 128] and ids[1]["name"] == ids[2]["name"]
    img = np.random.default_rng(0).random((300, 400, 3)).astype(np.float32)
    (f0, g0), (f1, g1), (f2, g2) = ex.forward_branches(ex.preprocess([img]))
    assert g1[0] == pytest.approx(g0[0] / 2, abs=1) and g2[0] == pytest.approx(g1[0] / 2, abs=1)
    assert f1.shape[-1] == f2.shape[-1] and not np.allclose(f1.shape, f2.shape)
    norms = f2.norm(dim=-1)
    assert float((norms - 1).abs().max()) < 1e-4  # unit patch vectors, as every branch
    with pytest.raises(ValueError):
        get_extractor("efficientnet_lite0", resolution=256, branches=((4, 10), (10, 14)), scales=(0.5, 1.0))


def test_a_roi_with_a_scaled_branch_fits_and_predicts_real_images(tmp_path: Path, tile: Path) -> None:
    ex = get_extractor("efficientnet_lite0", resolution=256, branches=((4, 10), (10, 14), (10, 14)),
                       scales=(1.0, 1.0, 0.5))
    ok = sorted((tile / "MT_Free" / "Imgs").glob("*.jpg"))[:12]
    # every branch fused (the choice of branches is tests/test_tuning.py's): the scaled one's path end to end
    model = RoiModel(tmp_path, "st", "tile", ex, ModelSettings(coreset_min=256, branch_select="all"))
    model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in ok])
    assert len(model.branches) == 3 and len(model.scorer.scales) == 3
    assert [b["resolution"] for b in model.state()["branches"]] == [256, 256, 128]
    crack = sorted((tile / "MT_Crack" / "Imgs").glob("*.jpg"))[0]
    good = sorted((tile / "MT_Free" / "Imgs").glob("*.jpg"))[150]
    imgs = [decode_image(p.read_bytes()) for p in (good, crack)]
    pred = model.predict(imgs, return_map=True)
    assert pred[1].score > pred[0].score
    for img, p in zip(imgs, pred, strict=True):  # the fused map (every branch's) at the image's own size
        assert p.anomaly_map.shape == (img.size[1], img.size[0])
    # reloaded: same banks
    again = RoiModel(tmp_path, "st", "tile", ex, ModelSettings(coreset_min=256, branch_select="all"))
    assert again.predict([decode_image(crack.read_bytes())])[0].score == pytest.approx(pred[1].score, abs=1e-6)


def test_the_disk_a_fit_needs_is_estimated_per_branch_grid(tmp_path: Path, tile: Path) -> None:
    """A fit is refused when the disk cannot hold it (tests/test_faults.py); the estimate counts each branch's
    patches at its own stride and scale: never below what the fit writes, and not the old over-estimate
    (every branch on the finest grid) that refused fits with room to spare."""
    ex = get_extractor("efficientnet_lite0", resolution=256, branches=((4, 10), (10, 14), (10, 14)),
                       scales=(1.0, 1.0, 0.6))
    ok = sorted((tile / "MT_Free" / "Imgs").glob("*.jpg"))[:4]
    samples = [(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in ok]
    model = RoiModel(tmp_path, "st", "tile", ex, ModelSettings(coreset_min=256))
    estimate = model.index.bytes_needed(samples)
    model.fit_ok(samples)
    written = sum(f.stat().st_size for f in (tmp_path / "models" / "st" / "tile" / "index").glob("*.f32"))
    finest_grid = sum(w // ex.stride * (h // ex.stride) for w, h in (ex.input_size(*s[1].size) for s in samples))
    assert written <= estimate < 1.1 * written + 4096, (estimate, written)
    assert estimate < 0.8 * finest_grid * sum(i.feature_dim for i in ex.branch_identities) * 4
