"""PatchCore per ROI on real images: fit, predict, incremental coreset, thresholds, storage, rebuild."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.errors import InputError, ModelNotReadyError
from core.image_io import decode_image
from core.method.bank_distances import BankDistances
from core.roi.model import ModelSettings, RoiModel
from core.roi.sample_scores import SampleScorer, nuisance_maps


def bank_rows(model: RoiModel) -> np.ndarray:
    """The row numbers of the first (patch) branch's coreset."""
    return model.branches[0].bank.rows

def sample(path: Path, mm: float | None = 0.1) -> tuple[bytes, object, dict]:
    data = path.read_bytes()
    return data, decode_image(data, mm_per_px=mm), {"source": "test"}


@pytest.fixture(scope="module")
def tire_files(tire: Path) -> dict[str, list[Path]]:
    return {"train": sorted((tire / "train" / "good" / "rgb").glob("*.png")),
            "good": sorted((tire / "test" / "good" / "rgb").glob("*.png")),
            "hole": sorted((tire / "test" / "hole" / "rgb").glob("*.png")),
            "cut": sorted((tire / "test" / "cut" / "rgb").glob("*.png"))}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, extractor, tire_files) -> tuple[Path, RoiModel]:
    root = tmp_path_factory.mktemp("data")
    model = RoiModel(root, "station1", "tire", extractor, ModelSettings(coreset_min=1000, coreset_max=3000))
    model.fit_ok([sample(p) for p in tire_files["train"][:12]])
    return root, model


def test_predict_separates_real_defects(fitted, tire_files) -> None:
    _, model = fitted
    goods = [sample(p)[1] for p in tire_files["good"][:8]]
    bads = [sample(p)[1] for p in tire_files["hole"][:8]]
    res = model.predict(goods + bads)
    scores = [r.score for r in res]
    auroc = roc_auc_score([0] * 8 + [1] * 8, scores)
    assert auroc >= 0.7, (auroc, scores)  # 0.78 measured; chance is 0.5
    r = res[-1]
    for key in ("is_anomaly", "score", "threshold", "inference_ms", "timings_ms", "model_version", "mm_per_px",
                "defects"):
        assert key in r.to_dict()
    assert set(r.timings_ms) == {"preprocess", "backbone", "knn", "postprocess"}
    assert r.to_dict()["inference_ms"] == pytest.approx(sum(r.to_dict()["timings_ms"].values()), abs=0.05)


def test_defect_regions_and_heatmap(fitted, tire_files) -> None:
    _, model = fitted
    holes = [sample(p)[1] for p in tire_files["hole"][:8]]
    scores = [r.score for r in model.predict(holes)]
    probe = holes[int(np.argmax(scores))]
    goods_max = max(r.score for r in model.predict([sample(p)[1] for p in tire_files["good"][:4]]))
    model.set_threshold(goods_max)  # an operator's manual threshold just above these goods
    try:
        r = model.predict([probe], heatmap=True)[0]
    finally:
        model.set_threshold(None)
    assert r.is_anomaly and r.threshold_method == "manual_override"
    d = r.defects()
    assert d["count"] >= 1 and d["regions"]
    reg = d["regions"][0]
    assert reg["area_mm2"] == pytest.approx(reg["area_px"] * 0.01, rel=1e-6)
    x, y, w, h = reg["bbox"]
    assert 0 <= x < 384 and 0 <= y < 512 and w > 0 and h > 0 and reg["max_score"] > r.threshold
    png = cv2.imdecode(np.frombuffer(r.heatmap_png, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (512, 384, 3)


def test_auto_threshold_comes_from_leave_one_out_ok_scores(fitted, tire_files) -> None:
    _, model = fitted
    m = model.manifest
    assert m["threshold"]["method"] == "ok_percentile"
    assert len(m["ok_scores"]) == 12
    assert model.threshold == pytest.approx(np.percentile(m["ok_scores"], 99), rel=1e-5)
    # the bank's own images score lower than their leave-one-out scores: the threshold is not optimistic
    own = [r.score for r in model.predict([sample(p)[1] for p in tire_files["train"][:12]])]
    assert np.mean(own) < np.mean(m["ok_scores"])
    goods = model.predict([sample(p)[1] for p in tire_files["good"][:10]])
    assert sum(r.is_anomaly for r in goods) <= 2


def test_single_ok_sample_still_gets_a_sane_threshold(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "one", extractor)
    model.fit_ok([sample(tire_files["train"][0])])
    th = model.threshold
    assert th is not None and np.isfinite(th) and th > 0.05
    own = model.predict([sample(tire_files["train"][0])[1]])[0]
    assert not own.is_anomaly and own.score < th


def test_predict_before_fit_is_a_clear_error(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "empty", extractor)
    with pytest.raises(ModelNotReadyError, match="fit_ok"):
        model.predict([sample(tire_files["good"][0])[1]])


def test_ng_calibration_and_manual_override(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "cal", extractor, ModelSettings(coreset_min=1000))
    model.fit_ok([sample(p) for p in tire_files["train"][:6]])
    ok_only = model.threshold
    state = model.send_ng([sample(p) for p in tire_files["hole"][:4]])
    th = model.manifest["threshold"]
    assert state["samples"]["ng"] == 4 and th["method"] == "ng_calibrated"
    ok_max, ng_min = max(model.manifest["ok_scores"]), min(model.manifest["ng_scores"])
    if th["details"]["separable"]:
        assert ok_max < model.threshold < ng_min
    else:
        assert th["details"]["false_rejects"] + th["details"]["false_accepts"] >= 1
    assert model.threshold != ok_only
    model.set_threshold(0.9)
    assert model.threshold == 0.9 and model.manifest["threshold"]["method"] == "manual_override"
    model.fit_ok([sample(tire_files["train"][7])])
    assert model.threshold == 0.9  # an override survives new samples
    with pytest.raises(InputError):
        model.set_threshold(-1)
    model.set_threshold(None)
    assert model.manifest["threshold"]["method"] == "ng_calibrated"
    # a calibrate request's policy is kept for later fits, until "config" restores the configured one
    st = model.calibrate("ok_only", ok_percentile=100)
    assert st["threshold_method"] == "ok_percentile" and st["threshold_policy"]["source"] == "calibrate"
    assert model.threshold == pytest.approx(max(model.manifest["ok_scores"]), abs=1e-5)
    model.fit_ok([sample(tire_files["train"][8])])
    assert model.manifest["threshold"]["method"] == "ok_percentile" and model.manifest["counts"]["ok"] == 8
    assert RoiModel(tmp_path, "r", "cal", extractor, ModelSettings(coreset_min=1000)).policy()["policy"] == "ok_only"
    assert model.calibrate("config")["threshold_method"] == "ng_calibrated"
    with pytest.raises(InputError, match="policy must be one of"):
        model.calibrate("bogus")
    with pytest.raises(InputError, match="ok_percentile"):
        model.calibrate("ok_only", ok_percentile=0)


def test_manual_policy_from_settings(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "man", extractor, ModelSettings(threshold_policy="manual", threshold_value=0.5))
    model.fit_ok([sample(p) for p in tire_files["train"][:2]])
    assert model.threshold == 0.5 and model.manifest["threshold"]["method"] == "manual"


def test_incremental_fit_extends_the_selection(tmp_path, extractor, tire_files) -> None:
    settings = ModelSettings(coreset_min=0, coreset_ratio=0.1, coreset_max=100_000)
    model = RoiModel(tmp_path, "r", "inc", extractor, settings)
    model.fit_ok([sample(p) for p in tire_files["train"][:4]])
    first = set(bank_rows(model).tolist())
    patches = model.manifest["counts"]["patches"]
    assert abs(len(first) - 0.1 * patches) <= 4  # each sample rounds its share up
    model.fit_ok([sample(p) for p in tire_files["train"][4:12]])
    second = set(bank_rows(model).tolist())
    assert first < second  # the old selection is kept and extended, not recomputed
    total = model.manifest["counts"]["patches"]
    assert abs(len(second) - 0.1 * total) <= 12
    assert all(r >= patches for r in second - first)  # additions come from the new samples


def test_later_samples_are_represented_once_the_bank_is_full(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "full", extractor, ModelSettings(coreset_min=1000, coreset_max=1000))
    model.fit_ok([sample(p) for p in tire_files["train"][:8]])
    per_sample = np.bincount(model.branches[0].bank_sample, minlength=8)
    assert bank_rows(model).size <= 1000 and (per_sample > 0).all(), per_sample


def test_bank_never_exceeds_coreset_max(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "cap", extractor, ModelSettings(coreset_min=200, coreset_max=400,
                                                                    coreset_ratio=0.5))
    model.fit_ok([sample(p) for p in tire_files["train"][:6]])
    assert 0 < bank_rows(model).size <= 400


def test_samples_are_stored_with_metadata_and_duplicates_skipped(fitted, tire_files) -> None:
    root, model = fitted
    samples = sorted((root / "models" / "station1" / "tire" / "samples" / "ok").glob("*.json"))
    assert len(samples) == 12
    meta = json.loads(samples[0].read_text())
    for key in ("role_id", "roi_id", "mm_per_px", "timestamp_utc", "source", "sha256"):
        assert key in meta
    assert meta["role_id"] == "station1" and meta["mm_per_px"] == 0.1
    image = samples[0].with_name(meta["image_file"])
    assert image.read_bytes() in {p.read_bytes() for p in tire_files["train"][:12]}
    rep = model.fit_ok([sample(tire_files["train"][0])])
    assert rep["added"] == [] and len(rep["duplicates"]) == 1 and model.manifest["counts"]["ok"] == 12


def test_reload_from_index_and_rebuild_from_samples(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "store", extractor, ModelSettings(coreset_min=800))
    model.fit_ok([sample(p) for p in tire_files["train"][:5]])
    probe = [sample(tire_files["cut"][0])[1]]
    before = model.predict(probe)[0]
    again = RoiModel(tmp_path, "r", "store", extractor, ModelSettings(coreset_min=800))
    assert np.array_equal(bank_rows(again), bank_rows(model)) and again.threshold == model.threshold
    assert again.predict(probe)[0].score == pytest.approx(before.score, abs=1e-6)
    shutil.rmtree(tmp_path / "models" / "r" / "store" / "index")
    rebuilt = RoiModel(tmp_path, "r", "store", extractor, ModelSettings(coreset_min=800))
    assert sorted(bank_rows(rebuilt).tolist()) == sorted(bank_rows(model).tolist())
    assert rebuilt.predict(probe)[0].score == pytest.approx(before.score, abs=1e-5)


def test_crash_leftovers_in_the_index_are_ignored(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "crash", extractor)
    model.fit_ok([sample(p) for p in tire_files["train"][:2]])
    with open(tmp_path / "models" / "r" / "crash" / "index" / "ok.f32", "ab") as fh:
        fh.write(b"\x01" * 1000)  # an append that never committed
    again = RoiModel(tmp_path, "r", "crash", extractor)
    assert again.manifest["counts"]["ok"] == 2
    again.fit_ok([sample(tire_files["train"][2])])
    third = RoiModel(tmp_path, "r", "crash", extractor)
    assert third.manifest["counts"]["ok"] == 3
    assert third.predict([sample(tire_files["good"][0])[1]])[0].score > 0


def test_other_backbone_rebuilds_the_index(tmp_path, extractor, tire_files) -> None:
    from core.backbones import get_extractor

    model = RoiModel(tmp_path, "r", "bb", extractor)
    model.fit_ok([sample(p) for p in tire_files["train"][:2]])
    other = get_extractor("efficientnet_lite0", resolution=128, device="cpu")
    moved = RoiModel(tmp_path, "r", "bb", other)
    assert moved.manifest["backbone"]["resolution"] == 128
    assert moved.store.embeddings("ok").meta["identity"]["resolution"] == 128
    assert moved.manifest["counts"]["ok"] == 2 and moved.predict([sample(tire_files["good"][0])[1]])


def test_memory_mapped_fit_selects_the_same_bank(tmp_path, extractor, tire_files) -> None:
    samples = [sample(p) for p in tire_files["train"][:5]]
    ram = RoiModel(tmp_path / "a", "r", "m", extractor, ModelSettings(coreset_min=500, memory_fit=True))
    disk = RoiModel(tmp_path / "b", "r", "m", extractor, ModelSettings(coreset_min=500, memory_fit=False))
    ram.fit_ok(samples)
    disk.fit_ok(samples)
    assert np.array_equal(bank_rows(ram), bank_rows(disk)) and ram.threshold == pytest.approx(disk.threshold)


def test_mask_limits_where_anomalies_count(tmp_path, extractor, tire_files) -> None:
    model = RoiModel(tmp_path, "r", "mask", extractor, ModelSettings(coreset_min=800))
    model.fit_ok([sample(p) for p in tire_files["train"][:4]])
    probe = sample(tire_files["hole"][0])[1]
    full = model.predict([probe], return_map=True)[0]
    peak_y, peak_x = np.unravel_index(np.argmax(full.anomaly_map), full.anomaly_map.shape)
    mask = np.full((512, 384), 255, np.uint8)
    mask[max(0, peak_y - 60) : peak_y + 60, max(0, peak_x - 60) : peak_x + 60] = 0
    ok, png = cv2.imencode(".png", mask)
    model.set_mask(png.tobytes())
    masked = model.predict([probe])[0]
    assert masked.score < full.score
    with pytest.raises(InputError):
        model.set_mask(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())


def test_a_fit_in_steps_builds_the_same_model_as_one_call(tmp_path, extractor, tire_files) -> None:
    """The worker fits large batches in steps (serving other ROIs in between): same bank, same threshold."""
    samples = [sample(p) for p in tire_files["train"][:12]]
    one = RoiModel(tmp_path / "a", "r", "x", extractor, ModelSettings(coreset_min=300))
    one.fit_ok(samples)
    steps = RoiModel(tmp_path / "b", "r", "x", extractor, ModelSettings(coreset_min=300))
    for start in range(0, 12, 5):
        steps.fit_ok(samples[start:start + 5], finalize=False)
    steps.finalize()
    assert np.array_equal(bank_rows(one), bank_rows(steps))
    assert steps.threshold == pytest.approx(one.threshold, rel=1e-6)
    assert steps.manifest["counts"] == one.manifest["counts"]


def _scores_by_full_search(model: RoiModel) -> tuple[list[float], list[float]]:
    cached = [b.distances for b in model.branches]
    for b in model.branches:
        b.distances = BankDistances()
    try:
        scorer = SampleScorer(model.scorer.branch_map, model.scorer.map_score, lambda: None)
        ok, ng, _ = scorer.round(model.branches, model.settings.holdout_max,
                                 {"ok": model.index.arrays("ok"), "ng": model.index.arrays("ng")},
                                     lambda: nuisance_maps(model.index, model.store, model.scorer.branch_map),
                                 model.scorer.active)  # fused as the model fuses
        return ok, ng
    finally:
        for b, d in zip(model.branches, cached, strict=True):
            b.distances = d


def test_threshold_updates_by_bank_delta_equal_a_full_search(tmp_path, extractor, tire_files) -> None:
    """Each fit_ok / send_ng rescores the threshold samples only against what changed in the bank
    (added entries, patches whose neighbour was pruned): same scores as searching the whole bank."""
    model = RoiModel(tmp_path, "r", "delta", extractor, ModelSettings(coreset_min=300, coreset_max=600, holdout_max=5))
    model.fit_ok([sample(p) for p in tire_files["train"][:4]])
    model.send_ng([sample(p) for p in tire_files["hole"][:3]])
    for i, path in enumerate(tire_files["train"][4:12]):
        model.fit_ok([sample(path)])
        if i == 3:
            model.send_ng([sample(p) for p in tire_files["cut"][:2]])
            model.set_mask(cv2.imencode(".png", np.pad(np.full((200, 200), 255, np.uint8), 50))[1].tobytes())
        stats = model.branches[0].distances.stats
        assert bank_rows(model).size <= 600
        ok, ng = _scores_by_full_search(model)
        assert model.manifest["ok_scores"] == pytest.approx(ok, abs=2e-5)
        assert model.manifest["ng_scores"] == pytest.approx(ng, abs=2e-5)
        assert len(ok) == 5 and len(ng) == (5 if i >= 3 else 3)
        if i != 3:  # one new hold-out sample searched in full, every other one updated by the delta
            assert stats["full"] == 1 and stats["updated"] + stats["unchanged"] == len(ok) + len(ng) - 1, stats


def test_memory_fit_keeps_the_index_in_ram_only_up_to_its_bound(tmp_path, extractor, tire_files) -> None:
    """memory_fit: the raw embeddings live in RAM until they outgrow memory_fit_max_mb, then they are
    memory-mapped (RAM stays bounded however many samples a ROI gets) and the model stays the same."""
    samples = [sample(p) for p in tire_files["train"][:6]]
    ram = RoiModel(tmp_path / "a", "r", "m", extractor, ModelSettings(coreset_min=500, memory_fit=True))
    ram.fit_ok(samples[:1])
    per_image_mb = ram.branches[0].emb["ok"].rows * ram.branches[0].emb["ok"].meta["dim"] * 4 / 2**20
    bounded = RoiModel(tmp_path / "b", "r", "m", extractor,
                       ModelSettings(coreset_min=500, memory_fit=True, memory_fit_max_mb=3.5 * per_image_mb))
    bounded.fit_ok(samples[:3])
    index = bounded.branches[0].emb["ok"]
    assert isinstance(index._ram, np.ndarray) and not isinstance(bounded.index.arrays("ok")[0], np.memmap)
    bounded.fit_ok(samples[3:])
    assert bounded.branches[0].emb["ok"]._ram is None and isinstance(bounded.index.arrays("ok")[0], np.memmap)
    ram.fit_ok(samples[1:3])
    ram.fit_ok(samples[3:])
    assert isinstance(ram.branches[0].emb["ok"]._ram, np.ndarray)
    assert np.array_equal(bank_rows(ram), bank_rows(bounded)) and ram.threshold == pytest.approx(bounded.threshold)


def test_a_model_from_before_the_coarse_branch_loads_and_builds_it_from_its_samples(
        tmp_path, extractor, tire_files, caplog) -> None:
    """A data root written with one branch (the layout before fine + coarse fusion): the fine index and
    bank are kept as they are, the coarse branch is indexed from the stored samples by itself, and the ROI
    predicts with both, saying so in its state."""
    import logging

    from core.backbones import get_extractor

    single = get_extractor("efficientnet_lite0", resolution=256, device="cpu", layers=(4, 10))
    assert single.identity == extractor.identity and len(extractor.branch_identities) == 4
    old = RoiModel(tmp_path, "r", "old", single, ModelSettings(coreset_min=300))
    old.fit_ok([sample(p) for p in tire_files["train"][:5]])
    manifest_path = old.store.manifest_path
    m = json.loads(manifest_path.read_text())
    for key in ("branches", "branch_scales"):  # what an earlier version's manifest did not have
        m.pop(key)
    manifest_path.write_text(json.dumps(m))
    fine_bank = old.store.index_dir.joinpath("bank.npz").read_bytes()
    with caplog.at_level(logging.INFO):
        new = RoiModel(tmp_path, "r", "old", extractor, ModelSettings(coreset_min=300))
    assert "indexing 5 ok samples" in caplog.text
    assert new.store.index_dir.joinpath("bank.npz").read_bytes() == fine_bank  # the fine bank was kept
    assert [b["name"] for b in new.state()["branches"]] == ["efficientnet_lite0", "efficientnet_lite0@10-14",
                                                            "efficientnet_lite0@10-14",
                                                            "efficientnet_lite0@10-14"]  # coarse at 1, 0.6, 0.4
    assert len(new.branches[1].emb["ok"].entries) == 5 and len(new.branches[1].bank) > 0
    fresh = RoiModel(tmp_path / "fresh", "r", "old", extractor, ModelSettings(coreset_min=300))
    fresh.fit_ok([sample(p) for p in tire_files["train"][:5]])  # the same samples fitted today
    probe = decode_image(tire_files["hole"][0].read_bytes())
    assert new.threshold == pytest.approx(fresh.threshold, abs=1e-6)
    assert new.predict([probe])[0].score == pytest.approx(fresh.predict([probe])[0].score, abs=1e-6)


def test_a_large_jpeg_roi_is_scored_on_a_reduced_decode_and_answered_in_its_own_pixels(fitted, tire_files,
                                                                                     extractor) -> None:
    """A real tire defect as a JPEG twice the size (768 x 1024): decoded at 1/2 in the DCT domain, its
    prediction matches the original's, with image size, regions and areas in the JPEG's own pixels."""
    _, model = fitted
    hole = next(p for p in tire_files["hole"][:8] if model.predict([sample(p)[1]])[0].is_anomaly)
    original = model.predict([sample(hole)[1]])[0]
    big = cv2.resize(cv2.imread(str(hole)), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    img = decode_image(data, mm_per_px=0.05, draft_for=extractor.input_size)
    assert img.geometry == 2.0 and img.size == original.image_size
    pred = model.predict([img], heatmap=True)[0]
    assert pred.is_anomaly and pred.score == pytest.approx(original.score, rel=0.05)
    assert pred.image_size == (big.shape[1], big.shape[0]) and pred.mm_per_px == 0.05
    assert pred.regions and all(x + w <= big.shape[1] and y + h <= big.shape[0] for x, y, w, h in
                                (r.bbox for r in pred.regions))
    scale = pred.regions[0].area_px / max(1, original.regions[0].area_px)
    assert 2 < scale < 10, scale  # about 4x the pixels of the half-size original (the region moves with the score)
    (x, y, w, h), (ox, oy, ow, oh) = pred.regions[0].bbox, original.regions[0].bbox
    assert abs((x + w / 2) - 2 * (ox + ow / 2)) < 0.1 * big.shape[1]  # the same place, in the JPEG's pixels
    assert abs((y + h / 2) - 2 * (oy + oh / 2)) < 0.1 * big.shape[0]
    assert pred.regions[0].area_mm2 == pytest.approx(pred.regions[0].area_px * 0.05**2, rel=0.01)
    heat = cv2.imdecode(np.frombuffer(pred.heatmap_png, np.uint8), cv2.IMREAD_COLOR)
    assert heat.shape[:2] == img.rgb.shape[:2]  # drawn at the decoded size (<= 1024 on the long side)
