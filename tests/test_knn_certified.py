"""The certified search (core/method/knn_certified.py): a prediction's score, verdict and regions equal the exact
search's, on real images, while only part of the patches is searched exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.image_io import decode_image
from core.method.knn import NearestNeighbour
from core.method.knn_certified import MIN_BANK, ClusteredBank, certified_maps, certified_top, support_radius
from core.method.scoring import input_res_map
from core.roi.model import ModelSettings, RoiModel
from tests.conftest import AGENT_ENV_KEYS


@pytest.mark.parametrize(("grid", "size", "sigma"), [((40, 42), (320, 336), 4.0), ((20, 21), (320, 336), 4.0),
                                                     ((24, 32), (192, 256), 2.5), ((13, 17), (200, 270), 4.0),
                                                     ((30, 30), (240, 240), 0.0)])
def test_a_map_pixel_depends_on_no_cell_outside_its_support(grid: tuple[int, int], size: tuple[int, int],
                                                            sigma: float) -> None:
    """Change every grid cell outside a pixel's support (support_radius cells around its own): the map value at
    that pixel does not move, to the last bit. The certified search relies on exactly this."""
    rng = np.random.default_rng(0)
    gh, gw = grid
    w, h = size
    ry, rx = support_radius(h, gh, sigma), support_radius(w, gw, sigma)
    base = rng.random(gh * gw).astype(np.float32)
    ref = input_res_map(base, grid, size, sigma)
    tight = False
    for y, x in [(0, 0), (h - 1, w - 1), (h // 2, w // 3), (7, w - 5), (h - 9, 3)] + [
            tuple(rng.integers(0, (h, w))) for _ in range(20)]:
        cy, cx = y * gh // h, x * gw // w
        inside = np.zeros((gh, gw), bool)
        inside[max(0, cy - ry) : cy + ry + 1, max(0, cx - rx) : cx + rx + 1] = True
        changed = base.copy()
        changed[~inside.ravel()] += rng.random(int((~inside).sum())).astype(np.float32) * 5
        assert input_res_map(changed, grid, size, sigma)[y, x] == ref[y, x], (y, x)
        if cy - ry + 1 >= 0:  # the support is at most one cell wider than needed: the cell one inside its edge
            edge = base.copy()  # counts for some pixel (a support 3 cells too wide failed this)
            edge[(cy - ry + 1) * gw + cx] += 5
            tight = tight or input_res_map(edge, grid, size, sigma)[y, x] != ref[y, x]
    assert tight, f"no pixel depends on a cell {ry - 1} from its own (support radius {ry}): the support is too wide"


def test_upper_bounds_are_real_distances_never_below_the_exact_ones() -> None:
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(3000, 48)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = rng.normal(size=(500, 48)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = NearestNeighbour(torch.from_numpy(bank)).distances(torch.from_numpy(q)).numpy()
    upper = ClusteredBank(torch.from_numpy(bank)).upper_bounds(torch.from_numpy(q))
    assert np.all(upper >= exact - 1e-5)
    assert np.mean(np.abs(upper - exact) < 1e-5) > 0.2  # often the nearest cluster holds the neighbour
    all_d = np.sqrt(np.clip(2 - 2 * q @ bank.T, 0, None))
    assert np.all(np.abs(all_d[:, None, :] - upper[:, None, None]).min(axis=2) < 1e-3)  # a bank entry's distance


@pytest.fixture(scope="module")
def tire_model(tmp_path_factory, tire: Path) -> RoiModel:
    # the shipped pair (fine + coarse) alone: the maths below runs over every branch of the model
    from core.backbones import get_extractor

    pair = get_extractor("efficientnet_lite0", resolution=256, device="cpu", branches=((4, 10), (10, 14)))
    model = RoiModel(tmp_path_factory.mktemp("cert"), "st1", "tire", pair,
                     ModelSettings(coreset_min=2048, coreset_max=4096))
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:12]
    model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes(), mm_per_px=0.1), {}) for p in train])
    assert all(b.clusters() is not None for b in model.branches)  # banks large enough for the certified search
    return model


def _predict(model: RoiModel, images: list, search: str) -> list:
    model.settings.knn_search = search
    try:
        return model.predict(images)
    finally:
        model.settings.knn_search = "certified"


def _same(certified: list, exact: list) -> None:
    for c, e in zip(certified, exact, strict=True):
        assert c.score == pytest.approx(e.score, abs=1e-6)  # float32 sums over other batches: the documented bound
        assert c.is_anomaly == e.is_anomaly
        assert c.defect_count == e.defect_count
        assert [(r.bbox, r.area_px, r.area_mm2) for r in c.regions] == [(r.bbox, r.area_px, r.area_mm2)
                                                                       for r in e.regions]
        assert [r.max_score for r in c.regions] == pytest.approx([r.max_score for r in e.regions], abs=1e-6)


def test_scores_verdicts_and_regions_equal_the_exact_search_on_real_images(tire_model: RoiModel, tire: Path) -> None:
    paths = (sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:6]
             + sorted((tire / "test" / "hole" / "rgb").glob("*.png"))[:4]
             + sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[:4])
    images = [decode_image(p.read_bytes(), mm_per_px=0.1) for p in paths]
    certified, exact = _predict(tire_model, images, "certified"), _predict(tire_model, images, "exact")
    _same(certified, exact)
    assert any(p.is_anomaly for p in exact) and not all(p.is_anomaly for p in exact)
    assert sum(p.defect_count for p in exact) > 0


def test_with_a_low_threshold_large_regions_are_still_exact(tire_model: RoiModel, tire: Path) -> None:
    """A threshold under most of the map: nearly every patch must be searched, and the regions still match."""
    paths = sorted((tire / "test" / "cut" / "rgb").glob("*.png"))[4:7]
    images = [decode_image(p.read_bytes(), mm_per_px=0.1) for p in paths]
    saved = dict(tire_model.manifest["threshold"])
    low = float(np.median([p.score for p in _predict(tire_model, images, "exact")])) * 0.8
    tire_model.manifest["threshold"]["value"] = low
    try:
        certified, exact = _predict(tire_model, images, "certified"), _predict(tire_model, images, "exact")
    finally:
        tire_model.manifest["threshold"] = saved
    assert certified[0].threshold == pytest.approx(low)
    _same(certified, exact)
    assert all(p.is_anomaly for p in exact)


def test_only_part_of_the_patches_is_searched_exactly(tire_model: RoiModel, tire: Path) -> None:
    """The point of it: on a good part, the exact search runs on a small share of the patches."""
    img = decode_image(sorted((tire / "test" / "good" / "rgb").glob("*.png"))[0].read_bytes())
    emb = tire_model.index.embed([img])[0]
    calls: list[int] = []

    def search(b: int):
        def run(idx: np.ndarray) -> np.ndarray:
            calls.append(idx.size)
            return tire_model.branches[b].search(emb.feats[b][idx])
        return run

    clusters = [b.clusters() for b in tire_model.branches]
    pairs, info = certified_maps([search(b) for b in range(len(clusters))], clusters, emb.feats, emb.grids,
                                 emb.input_size, tire_model.settings.blur_sigma,
                                 tire_model.scorer.mask_at(emb.input_size), tire_model.scorer.scales,
                                 tire_model.threshold)
    total = sum(f.shape[0] for f in emb.feats)
    assert info["exact_patches"] == sum(calls) < 0.25 * total, (info, total)
    exact_maps = [input_res_map(b.search(emb.feats[i]), emb.grids[i], emb.input_size, tire_model.settings.blur_sigma)
                  for i, b in enumerate(tire_model.branches)]
    for (_, m), e in zip(pairs, exact_maps, strict=True):
        assert m.max() == pytest.approx(e.max(), abs=1e-6)  # the peak is exact (to float32 rounding)
        assert np.all(m >= e - 1e-5)  # elsewhere bounds from above


def test_the_most_anomalous_patches_come_exact_from_the_bounds() -> None:
    """certified_top on random vectors: the same set as sorting the exact distances, from part of the search."""
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(2048, 32)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = rng.normal(size=(900, 32)).astype(np.float32)
    q[:20] += bank[:20] * 0.1  # a few far, most near: like an image's patches
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    knn = NearestNeighbour(torch.from_numpy(bank))
    exact = knn.distances(torch.from_numpy(q)).numpy()
    dist = ClusteredBank(torch.from_numpy(bank)).upper_bounds(torch.from_numpy(q))
    done = np.zeros(len(q), bool)
    searched: list[int] = []

    def search(idx: np.ndarray) -> np.ndarray:
        searched.append(idx.size)
        return knn.distances(torch.from_numpy(q[idx])).numpy()

    top = certified_top(dist, done, search, 18)
    assert set(top.tolist()) == set(np.argsort(exact)[-18:].tolist())
    assert np.allclose(dist[top], exact[top], atol=1e-5) and sum(searched) < len(q)


def test_an_ng_term_under_the_certified_search_equals_the_exact_one(tire_model: RoiModel, tire: Path) -> None:
    """A ROI whose NG samples rank its parts keeps the certified search: the term reads the same top patches."""
    from core.method import ng_rank

    def tops(paths: list[Path]) -> list[list[np.ndarray]]:
        out = []
        for emb in tire_model.index.embed([decode_image(p.read_bytes()) for p in paths]):
            out.append([f[ng_rank.top_rows(b.search(f))] for f, b in zip(emb.feats, tire_model.branches,
                                                                          strict=True)])
        return out

    good = sorted((tire / "train" / "good" / "rgb").glob("*.png"))
    cuts = sorted((tire / "test" / "cut" / "rgb").glob("*.png"))
    banks = [b.bank.feats.numpy() for b in tire_model.branches]
    term = ng_rank.fit_term("linear_head", banks, tops(good[12:20]), tops(cuts[8:14]), 0.01)
    images = [decode_image(p.read_bytes(), mm_per_px=0.1) for p in good[22:26] + cuts[:3]]
    tire_model.scorer.ng = term
    try:
        certified, exact = _predict(tire_model, images, "certified"), _predict(tire_model, images, "exact")
    finally:
        tire_model.scorer.ng = None
    # a good part: the certified search, a part of it; a flagged one whose term lifts the map: the exact map
    modes = [(c.search.mode, c.is_anomaly, c.search.searched < c.search.patches) for c in certified]
    assert all(m[0] == "certified" or m[1] for m in modes), modes
    assert sum(m == ("certified", False, True) for m in modes) >= 2, modes
    _same(certified, exact)
    plain = _predict(tire_model, images, "exact")
    assert any(abs(e.score - p.score) > 1e-3 for e, p in zip(exact, plain, strict=True))  # the term is in them


def test_a_heatmap_or_another_score_statistic_uses_the_exact_search(tire_model: RoiModel, tire: Path) -> None:
    img = decode_image(sorted((tire / "test" / "hole" / "rgb").glob("*.png"))[0].read_bytes())
    with_map = tire_model.predict([img], heatmap=True, return_map=True)[0]
    exact = _predict(tire_model, [img], "exact")[0]
    assert with_map.score == exact.score  # the same code path: equal to the bit
    assert np.array_equal(with_map.anomaly_map, tire_model.predict([img], return_map=True)[0].anomaly_map)



class _Spy:
    """Counts the patches each branch's real search is given (the branches' own `search`, wrapped)."""

    def __init__(self, model: RoiModel) -> None:
        self.model, self.patches = model, 0
        self._orig = [b.search for b in model.branches]

    def __enter__(self) -> _Spy:
        for b, orig in zip(self.model.branches, self._orig, strict=True):
            b.search = lambda feats, orig=orig: (setattr(self, "patches", self.patches + len(feats)), orig(feats))[1]
        return self

    def __exit__(self, *_: object) -> None:
        for b, orig in zip(self.model.branches, self._orig, strict=True):
            b.search = orig


def _counted(model: RoiModel, images: list, search: str, **kw: object) -> tuple[list, int]:
    model.settings.knn_search = search
    try:
        with _Spy(model) as spy:
            preds = model.predict(images, **kw)
        return preds, spy.patches
    finally:
        model.settings.knn_search = "certified"


def _certified_against_exact(model: RoiModel, tire: Path, defect: str, n: int) -> tuple[list, int, int]:
    """3 good and n defective tires predicted both ways: (images, patches the certified search searched,
    patches the exact one searched), the results checked equal."""
    paths = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:3] + sorted(
        (tire / "test" / defect / "rgb").glob("*.png"))[:n]
    images = [decode_image(p.read_bytes(), mm_per_px=0.1) for p in paths]
    certified, searched = _counted(model, images, "certified")
    exact, all_patches = _counted(model, images, "exact")
    _same(certified, exact)
    return images, searched, all_patches


def test_the_certified_path_is_the_one_that_ran(tire_model: RoiModel, tire: Path) -> None:
    """Equal results could also come from both sides running the exact search: the spy shows the certified
    one searched a small share of the patches the exact one did, for the same scores and regions."""
    _, searched, all_patches = _certified_against_exact(tire_model, tire, "cut", 2)
    assert 0 < searched < 0.5 * all_patches, (searched, all_patches)


def test_with_a_mask_a_heatmap_alone_or_a_percentile_the_results_equal_the_exact_search(
        tmp_path: Path, tire_model: RoiModel, tire: Path, extractor) -> None:
    """A mask (a bound could decide a score inside it), a heatmap asked for without the full map, and the
    percentile statistic: each equal to the exact search; the last two run the exact search themselves."""
    import shutil

    import cv2

    root = tmp_path / "data"
    shutil.copytree(tire_model.store.root.parents[2], root)
    model = RoiModel(root, "st1", "tire", extractor, ModelSettings(coreset_min=2048, coreset_max=4096))
    mask = np.zeros((384, 512), np.uint8)
    mask[:, 150:420] = 255
    model.set_mask(cv2.imencode(".png", mask)[1].tobytes())
    images, searched, all_patches = _certified_against_exact(model, tire, "hole", 3)
    exact, _ = _counted(model, images, "exact")
    assert searched < all_patches
    with_heatmap, searched = _counted(model, images[-1:], "certified", heatmap=True)
    assert searched == all_patches // len(images) and with_heatmap[0].heatmap_png  # the full search, for the map
    assert with_heatmap[0].score == exact[-1].score
    model.settings.score_stat = "percentile"
    pct, searched = _counted(model, images, "certified")
    pct_exact, _ = _counted(model, images, "exact")
    assert searched == all_patches and [p.score for p in pct] == [p.score for p in pct_exact]


def _metric(text: str, name: str, mode: str) -> float:
    line = next((x for x in text.splitlines() if x.startswith(f'{name}_total{{mode="{mode}"}}')), None)
    return float(line.split()[-1]) if line else 0.0


def test_a_running_agent_with_banks_past_the_cut_over_answers_as_the_exact_search(tmp_path: Path, tire: Path) -> None:
    """End to end: banks of 2100 and 1050 patches from 8 images (past the cut-over, unlike the other agent
    tests' 1000) fitted through the CLI; one agent on the shipped `knn_search: certified`, then the same data
    root with `exact`. The metrics show which search ran (the certified one on a small share of the
    patches); scores, verdicts and regions agree, and a heatmap request (always the exact search) scores as
    the certified one within 1e-6."""
    import httpx

    from tests.agent_proc import Agent
    from tests.broker import free_port
    from tests.conftest import _real_or_none

    root = tmp_path / "data"
    env = {"ANOMALY_AGENT_DEFAULTS__CORESET_MIN": "2100",  # the coarse branch: half
           "ANOMALY_AGENT_DEFAULTS__BRANCH_SELECT": "default"}  # fine + coarse (the small view's bank is small)
    train = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[:8]
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--data-root", str(root), "--log-level", "WARNING",
                        "fit", "--role", "st1", "--roi", "tire", "--quiet", *map(str, train)],
                       env={**os.environ, **AGENT_ENV_KEYS, **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((root / "models" / "st1" / "tire" / "manifest.json").read_text())
    banks = [b["bank"] for b in manifest["branches"]]
    assert len(banks) == 4 and min(banks[:2]) >= MIN_BANK, banks
    probes = [sorted((tire / "test" / k / "rgb").glob("*.png"))[i].read_bytes()
              for k, i in (("good", 0), ("good", 1), ("cut", 0), ("hole", 0), ("cut", 1), ("hole", 1), ("cut", 2),
                           ("hole", 2), ("combined", 0))]
    answers: dict[str, list[dict]] = {}
    metrics: dict[str, str] = {}
    for mode in ("certified", "exact"):
        port = free_port()
        agent = Agent(root, http_port=port, env={**env, "ANOMALY_AGENT_DEFAULTS__KNN_SEARCH": mode}).start()
        with httpx.Client(base_url=agent.http, timeout=120) as c:
            got = [c.post("/predict", data={"role_id": "st1", "roi_id": "tire"},
                          files={"file": ("p.png", p, "image/png")}).json() for p in probes]
            assert all("score" in g for g in got), got
            answers[mode] = got
            metrics[mode] = c.get("/metrics").text
            if mode == "certified":
                heat = c.post("/predict", data={"role_id": "st1", "roi_id": "tire", "heatmap": "true"},
                              files={"file": ("p.png", probes[2], "image/png")}).json()
                metrics["after_heatmap"] = c.get("/metrics").text
        assert agent.sigterm() == 0
    searched = _metric(metrics["certified"], "anomaly_agent_knn_patches_searched", "certified")
    patches = _metric(metrics["certified"], "anomaly_agent_knn_patches", "certified")
    # on the real tires a small share; on the synthetic stand-ins (a clone without ../shared) their 8-image bank
    # leaves much of each map near the threshold, so more is searched exactly, but never all of it
    share = 0.5 if _real_or_none() is not None else 0.9
    assert 0 < searched < share * patches, (searched, patches)
    assert _metric(metrics["certified"], "anomaly_agent_knn_patches", "exact") == 0
    assert _metric(metrics["after_heatmap"], "anomaly_agent_knn_patches", "exact") > 0  # the heatmap's search
    assert _metric(metrics["exact"], "anomaly_agent_knn_patches", "certified") == 0
    for cert, exact in zip(answers["certified"], answers["exact"], strict=True):
        assert cert["score"] == pytest.approx(exact["score"], abs=1e-6)
        assert cert["is_anomaly"] == exact["is_anomaly"]
        assert cert["defects"] == exact["defects"]  # count, areas, every region's bbox and peak
    assert any(a["is_anomaly"] for a in answers["exact"])  # the comparison covers regions, not only verdicts
    assert heat["score"] == pytest.approx(answers["certified"][2]["score"], abs=1e-6)
