"""Start-up after damage: a corrupt or missing manifest, bank, embedding index or mask is rebuilt from the
stored samples (and says so in the log); a corrupt sample is quarantined, never crashing the start."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from core.image_io import decode_image
from core.roi.model import ModelSettings, RoiModel

SETTINGS = ModelSettings(coreset_min=500, coreset_max=2000)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, extractor, tire: Path) -> tuple[Path, float, bytes]:
    root = tmp_path_factory.mktemp("ref")
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:6]
    model = RoiModel(root, "st1", "tire", extractor, SETTINGS)
    model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {"source": "test"}) for p in train])
    probe = sorted((tire / "test" / "hole" / "rgb").glob("*.png"))[0].read_bytes()
    return root, model.predict([decode_image(probe)])[0].score, probe


def damaged(tmp_path: Path, reference: tuple[Path, float, bytes]) -> tuple[Path, Path]:
    root = tmp_path / "data"
    shutil.copytree(reference[0], root)
    return root, root / "models" / "st1" / "tire"


GARBAGE = b"\x00\xffnot what was written\x13" * 7


@pytest.mark.parametrize("what", ["manifest.json", "index/bank.npz", "index/ok.json", "index/ok.f32", "mask.png",
                                  "manifest.json+index"])
def test_damaged_model_files_are_rebuilt_and_predict_the_same(tmp_path, extractor, reference, what, caplog) -> None:
    root, roi = damaged(tmp_path, reference)
    if what == "index/ok.f32":
        data = (roi / what).read_bytes()
        (roi / what).write_bytes(data[: len(data) // 3])  # a power cut mid-write
    elif what == "manifest.json+index":
        (roi / "manifest.json").unlink()
        shutil.rmtree(roi / "index")
    else:
        (roi / what).write_bytes(GARBAGE)
    with caplog.at_level(logging.INFO):
        model = RoiModel(root, "st1", "tire", extractor, SETTINGS)
    assert model.manifest["counts"]["ok"] == 6 and model.threshold is not None
    score = model.predict([decode_image(reference[2])])[0].score
    assert score == pytest.approx(reference[1], abs=1e-5)
    if what != "mask.png":
        assert any(w in caplog.text for w in ("corrupt", "rebuil", "stale", "indexing", "selected")), caplog.text


@pytest.mark.parametrize("damage", ["image", "json", "image_gone"])
def test_a_corrupt_sample_is_quarantined_not_fatal(tmp_path, extractor, reference, damage, caplog) -> None:
    root, roi = damaged(tmp_path, reference)
    victim = sorted((roi / "samples" / "ok").glob("*.json"))[2]
    image = next(p for p in victim.parent.glob(victim.stem + ".*") if p.suffix != ".json")
    if damage == "image":
        image.write_bytes(GARBAGE)
        shutil.rmtree(roi / "index")  # the rebuild has to read every image again
    elif damage == "json":
        victim.write_bytes(GARBAGE)
    else:
        image.unlink()
    before = {p.name: p.read_bytes() for p in victim.parent.glob(victim.stem + ".*")}  # what is left of it
    with caplog.at_level(logging.INFO):
        model = RoiModel(root, "st1", "tire", extractor, SETTINGS)
    assert model.manifest["counts"]["ok"] == 5
    quarantined = roi / "quarantine" / "ok"
    assert (quarantined / f"{victim.stem}.reason.json").exists() and "quarantined" in caplog.text
    assert not list((roi / "samples" / "ok").glob(victim.stem + ".*"))
    assert before and {name: (quarantined / name).read_bytes() for name in before} == before  # moved, never deleted
    assert model.predict([decode_image(reference[2])])[0].score > 0


def test_a_corrupt_mask_is_quarantined_and_the_state_says_so(tmp_path, extractor, reference, caplog) -> None:
    """From a model that had a mask: the damaged mask is moved aside with its reason, the state reports
    has_mask false with mask_error, and the threshold and scores are those of the whole image again."""
    import cv2
    import numpy as np

    root, roi = damaged(tmp_path, reference)
    whole = RoiModel(root, "st1", "tire", extractor, SETTINGS)
    whole_threshold = whole.threshold
    mask = np.zeros((384, 512), np.uint8)
    mask[:, :200] = 255  # the defect side of the probe is outside: masked scores differ from the whole image
    masked = whole.set_mask(cv2.imencode(".png", mask)[1].tobytes())
    assert masked["has_mask"] and masked["threshold"] != pytest.approx(whole_threshold, abs=1e-6)
    (roi / "mask.png").write_bytes(GARBAGE)
    from core.roi.model import stored_rois

    disk = {s["roi_id"]: s for _, s in stored_rois(root)}["tire"]  # what `anomaly-agent models` and /models say
    assert not disk["has_mask"] and "cannot be decoded" in disk["mask_error"], disk  # before any load: checked
    with caplog.at_level(logging.WARNING):
        model = RoiModel(root, "st1", "tire", extractor, SETTINGS)
    state = model.state()
    assert not state["has_mask"] and "cannot be decoded" in state["mask_error"], state
    assert "quarantine" in caplog.text and "whole image" in caplog.text
    assert len(list((roi / "quarantine" / "mask").glob("*.reason.json"))) == 1 and not (roi / "mask.png").exists()
    assert [p.read_bytes() for p in (roi / "quarantine" / "mask").iterdir()
            if not p.name.endswith(".reason.json")] == [GARBAGE]  # the damaged mask kept, byte for byte
    assert model.threshold == pytest.approx(whole_threshold, abs=1e-6)
    assert model.predict([decode_image(reference[2])])[0].score == pytest.approx(reference[1], abs=1e-5)
    fixed = model.set_mask(cv2.imencode(".png", mask)[1].tobytes())
    assert fixed["has_mask"] and "mask_error" not in fixed
