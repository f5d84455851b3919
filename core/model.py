"""PatchCore model of one (role_id, roi_id): fit_ok, send_ng, predict, thresholds, persistence."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from . import thresholds
from .backbones import FeatureExtractor
from .errors import AnomalyError, BackboneMismatchError, InputError, ModelNotReadyError, StorageError
from .fusion import BranchScale, fuse_maps, fuse_scores
from .heatmap import render_heatmap, thumbnail
from .image_io import ImageInput, decode_image
from .knn import NearestNeighbour
from .memory_bank import CoresetSize
from .patch_branch import PatchBranch
from .sample_scores import SampleScorer
from .scoring import defect_regions, image_score, input_res_map, resize_mask
from .storage import RoiStore, SampleRecord, list_rois, utc_now

log = logging.getLogger(__name__)

THRESHOLD_POLICIES = thresholds.POLICIES


CALIBRATION_POLICIES = (None, "auto", "ok_only", "manual", "config")


@dataclass
class ModelSettings:
    """Per-ROI settings (config `defaults`, overridable per ROI). See docs/configuration.md."""

    coreset_ratio: float = 0.1
    coreset_min: int = 4096
    coreset_max: int = 8192
    proj_dim: int = 64
    score_stat: str = "max"
    score_percentile: float = 99.0
    blur_sigma: float = 4.0
    threshold_policy: str = "auto"
    threshold_value: float | None = None
    ok_percentile: float = 99.0
    holdout_max: int = 50
    ng_margin: float = 0.5
    ng_recall: float | None = None
    memory_fit: bool = False
    memory_fit_max_mb: float = 512.0
    fit_batch_size: int = 8
    min_defect_area_px: int = 0
    knn_backend: str = "auto"

    def coreset_size(self) -> CoresetSize:
        return CoresetSize(self.coreset_ratio, self.coreset_min, self.coreset_max)

    def bank_key(self) -> dict:
        return {"coreset_ratio": self.coreset_ratio, "coreset_min": self.coreset_min,
                "coreset_max": self.coreset_max, "proj_dim": self.proj_dim}


@dataclass
class Embedded:
    feats: list[np.ndarray]  # per branch: [n, D_b] float32
    grids: list[tuple[int, int]]  # per branch
    input_size: tuple[int, int]  # backbone input (w, h)
    image_size: tuple[int, int]  # ROI (w, h)
    timings: dict[str, float] = field(default_factory=dict)


def policy_of(m: dict) -> dict:
    """The threshold policy in force for a manifest: configured, or set by a calibrate request."""
    s = m.get("settings", {})
    base = {"policy": s.get("threshold_policy"), "ok_percentile": s.get("ok_percentile"),
            "ng_margin": s.get("ng_margin"), "ng_recall": s.get("ng_recall")}
    if m["threshold"]["method"] == "manual_override":
        return {"policy": "manual", "source": "calibrate"}
    if m.get("policy_override"):
        return {**base, **m["policy_override"], "source": "calibrate"}
    return {**base, "source": "config"}


def manifest_state(m: dict, has_mask: bool) -> dict:
    """The public state of a ROI (MQTT `state` topic, CLI `models`) from its manifest."""
    return {"role_id": m["role_id"], "roi_id": m["roi_id"], "model_version": m["version"],
            "samples": {"ok": m["counts"]["ok"], "ng": m["counts"]["ng"]},
            "bank_size": m["counts"]["bank"], "patches": m["counts"]["patches"],
            "threshold": m["threshold"]["value"], "threshold_method": m["threshold"]["method"],
            "threshold_details": m["threshold"]["details"], "threshold_policy": policy_of(m), "backbone": m["backbone"],
            "branches": [{"name": b["identity"]["name"], "resolution": b["identity"]["resolution"],
                          "bank": b.get("bank")} for b in m.get("branches", [])],
            "has_mask": has_mask, **({"mask_error": m["mask_error"]} if m.get("mask_error") and not has_mask else {}),
            "updated_utc": m["updated_utc"]}


def stored_rois(data_root: Path) -> list[tuple[dict, dict]]:
    """(manifest, public state) of every ROI with a model on disk. Read-only, safe beside the worker:
    manifests are written atomically."""
    out = []
    for role, roi in list_rois(data_root):
        store = RoiStore(data_root, role, roi)
        manifest = store.read_manifest()
        if manifest:
            out.append((manifest, manifest_state(manifest, store.mask_path.exists())))
    return out


def nuisance_views(img: ImageInput, stride_px: float) -> list[ImageInput]:
    """Copies of an OK image with the variation a new good part shows on a fixed station: shifted by
    one feature stride, rotated by +-2 degrees, scaled by +-5 %, brightness +-10 %."""
    w, h = img.size
    centre = (w / 2, h / 2)
    views = []
    for angle, scale, dx, dy, gain in ((0, 1, stride_px, 0, 1), (0, 1, 0, stride_px, 1), (2, 1, 0, 0, 1),
                                       (-2, 1, 0, 0, 1), (0, 1.05, 0, 0, 1), (0, 0.95, 0, 0, 1),
                                       (0, 1, 0, 0, 1.1), (0, 1, 0, 0, 0.9)):
        mat = cv2.getRotationMatrix2D(centre, angle, scale)
        mat[:, 2] += (dx, dy)
        rgb = cv2.warpAffine(img.rgb, mat, img.size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        views.append(ImageInput(np.clip(rgb * gain, 0, 1), img.mm_per_px, 1.0, img.size, img.format, img.bit_depth))
    return views


class RoiModel:
    """Stored samples, patch branches (index + bank each), threshold of one ROI. Not thread-safe: one
    worker owns it."""

    def __init__(self, data_root: Path, role_id: str, roi_id: str, extractor: FeatureExtractor,
                 settings: ModelSettings | None = None, debug_dir: Path | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        # progress: called between steps of long work (index rebuild, fits, threshold scoring), e.g. to
        # tell a service watchdog that the caller is busy, not hung
        self.progress = progress or (lambda: None)
        self.store = RoiStore(Path(data_root), role_id, roi_id)
        self.extractor = extractor
        self.settings = settings or ModelSettings()
        self.debug_dir = debug_dir
        self.identity = extractor.identity.to_dict()
        s = self.settings
        idents = extractor.branch_identities
        # every further branch gets the first one's bank memory (entries x dims), not more: RAM <= 2x one bank
        self.branches = [PatchBranch(self.store.index_dir, f"b{i}" if i else "", ident.to_dict(), ident.feature_dim,
                                     s.coreset_size().scaled(idents[0].feature_dim / ident.feature_dim), s.proj_dim,
                                     extractor.device, s.knn_backend)
                         for i, ident in enumerate(idents)]
        self.bank = self.branches[0].bank
        self._emb = self.branches[0].emb
        self.manifest = self.store.read_manifest() or self._new_manifest()
        self.mask, mask_error = self.store.load_mask()
        self._mask_cache: dict[tuple[int, int], np.ndarray | None] = {}
        self._dirty = False
        self._known: dict[str, dict[str, str]] = {}  # sha256 -> sample_id per kind, for deduplication
        self.last_outcomes: list[tuple[str, bool]] = []
        self._scorer = SampleScorer(self._branch_map, self._map_score, self.progress)
        self.scales = [BranchScale(**x) for x in self.manifest.get("branch_scales", [])]
        t0 = time.perf_counter()
        if mask_error:
            self.manifest["mask_error"] = mask_error
        self._sync_index(force_threshold=bool(mask_error))
        log.info("ROI %s/%s loaded: %d OK, %d NG samples, banks %s patches, threshold %s (%.0f ms)",
                 role_id, roi_id, self.manifest["counts"]["ok"], self.manifest["counts"]["ng"],
                 [len(b.bank) for b in self.branches], self.manifest["threshold"]["value"],
                 (time.perf_counter() - t0) * 1000)

    # ------------------------------------------------------------------ state
    def _new_manifest(self) -> dict:
        return {"format": 1, "role_id": self.store.role_id, "roi_id": self.store.roi_id, "version": 0,
                "backbone": self.identity, "settings": asdict(self.settings),
                "threshold": {"value": None, "method": "none", "details": {}},
                "counts": {"ok": 0, "ng": 0, "bank": 0, "patches": 0}, "ok_scores": [], "ng_scores": [],
                "created_utc": utc_now(), "updated_utc": utc_now()}

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def threshold(self) -> float | None:
        return self.manifest["threshold"]["value"]

    @property
    def bank_rows(self) -> np.ndarray:
        return self.bank.rows

    @property
    def _knn(self) -> NearestNeighbour | None:
        return self.branches[0].knn

    def state(self) -> dict:
        return manifest_state(self.manifest, self.mask is not None)

    def _branch_info(self) -> list[dict]:
        return [{"identity": b.identity, "bank_rows_total": b.emb["ok"].rows, "bank": len(b.bank)}
                for b in self.branches]

    # ------------------------------------------------------------ embeddings
    def embed(self, images: list[ImageInput]) -> list[Embedded]:
        """Backbone features of images for every branch, batched by size (fit_batch_size per forward)."""
        out: list[Embedded | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(img.size, []).append(i)
        bs = max(1, self.settings.fit_batch_size)
        for size, idxs in by_size.items():
            for start in range(0, len(idxs), bs):
                chunk = idxs[start : start + bs]
                self.progress()
                t0 = time.perf_counter()
                batch = self.extractor.preprocess([images[i].rgb for i in chunk])
                t1 = time.perf_counter()
                per_branch = self.extractor.forward_branches(batch)
                if batch.device.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                input_size = (batch.shape[3], batch.shape[2])
                arrays = [f.cpu().numpy() for f, _ in per_branch]
                per = {"preprocess": (t1 - t0) * 1000 / len(chunk), "backbone": (t2 - t1) * 1000 / len(chunk),
                       "batch_size": len(chunk)}
                for j, i in enumerate(chunk):
                    out[i] = Embedded([a[j] for a in arrays], [g for _, g in per_branch], input_size, size, dict(per))
        return out  # type: ignore[return-value]

    def _records_images(self, records: list[SampleRecord]) -> list[ImageInput]:
        return [decode_image(r.image_path.read_bytes(), mm_per_px=r.meta.get("mm_per_px"),
                             max_bytes=1 << 62, max_decode_pixels=1 << 62, max_decoded_bytes=1 << 62)
                for r in records]

    def _readable_samples(self, kind: str) -> list[SampleRecord]:
        """Stored samples, with the unreadable ones (corrupt JSON or image, image gone) quarantined."""
        for meta_path in self.store.unreadable_samples(kind):
            self.store.quarantine(kind, meta_path.stem, "sample JSON unreadable or its image missing")
        return self.store.list_samples(kind)

    def _decodable(self, kind: str, records: list[SampleRecord]) -> tuple[list[SampleRecord], list[ImageInput]]:
        good, images = [], []
        for rec in records:
            try:
                images.append(self._records_images([rec])[0])
                good.append(rec)
            except (AnomalyError, OSError) as exc:
                self.store.quarantine(kind, rec.sample_id, f"image cannot be decoded: {exc}")
        return good, images

    def _arrays(self, kind: str) -> list[np.ndarray]:
        """Each branch's embedding rows of one kind: in RAM (memory_fit, bounded) or memory-mapped."""
        s = self.settings
        return [b.index_array(kind, s.memory_fit, s.memory_fit_max_mb) for b in self.branches]

    def _index_array(self, kind: str) -> np.ndarray:
        return self._arrays(kind)[0]

    def _append_embeddings(self, kind: str, records: list[SampleRecord], images: list[ImageInput],
                           branches: list[PatchBranch] | None = None) -> list[list[tuple[int, int]]]:
        """Embed once and append to each branch; returns per branch the (offset, count) spans."""
        embs = self.embed(images)
        out = []
        for b, branch in enumerate(self.branches):
            if branches is not None and branch not in branches:
                out.append([])
                continue
            items = [({"sample_id": rec.sample_id, "grid": list(emb.grids[b]), "input_size": list(emb.input_size),
                       "image_size": list(emb.image_size)}, emb.feats[b])
                     for emb, rec in zip(embs, records, strict=True)]
            out.append(branch.append(kind, items))
        return out

    # ------------------------------------------------------------ the index
    def _sync_index(self, force_threshold: bool = False) -> None:
        """Make every branch's embedding index and bank match the stored samples and the features."""
        for kind in ("ok", "ng"):
            records = self._readable_samples(kind)
            ids = [r.sample_id for r in records]
            for branch in self.branches:
                if branch.stale(kind, ids):
                    if records:
                        log.warning("%s/%s: %s index of branch %s stale (features or samples changed): rebuilding "
                                    "from %d samples", self.store.role_id, self.store.roi_id, kind,
                                    branch.identity["name"], len(records))
                    branch.reset(kind)
            done = [len(b.emb[kind].entries) for b in self.branches]
            missing = records[min(done):]
            if missing:
                log.info("%s/%s: indexing %d %s samples", self.store.role_id, self.store.roi_id, len(missing), kind)
            position = {sid: i for i, sid in enumerate(ids)}
            for start in range(0, len(missing), 64):
                chunk, images = self._decodable(kind, missing[start : start + 64])
                runs: dict[tuple[int, ...], list[int]] = {}  # the branches that lack a sample -> its chunk places
                for j, rec in enumerate(chunk):
                    todo = tuple(b for b, n in enumerate(done) if n <= position[rec.sample_id])
                    runs.setdefault(todo, []).append(j)
                for todo, places in runs.items():
                    self._append_embeddings(kind, [chunk[j] for j in places], [images[j] for j in places],
                                            [self.branches[b] for b in todo])
        previous = self.manifest.get("branches") or [{"identity": self.manifest.get("backbone"),
                                                      "bank_rows_total": self.manifest.get("bank_rows_total")}]
        arrays = self._arrays("ok")
        for b, branch in enumerate(self.branches):
            before = previous[b] if b < len(previous) else {}
            trusted = (before.get("identity") == branch.identity and self.manifest.get("bank_key") ==
                       self.settings.bank_key() and before.get("bank_rows_total") == branch.emb["ok"].rows)
            if branch.load_or_reselect(arrays[b], trusted, self.progress) and branch.emb["ok"].entries:
                log.info("%s/%s: bank of branch %s selected from %d samples: %d patches", self.store.role_id,
                         self.store.roi_id, branch.identity["name"], len(branch.emb["ok"].entries), len(branch.bank))
            branch.refresh_knn()
        ok = self._emb["ok"]
        changed = (self.manifest["counts"]["ok"] != len(ok.entries) or self.manifest["backbone"] != self.identity
                   or self.manifest["counts"]["ng"] != len(self._emb["ng"].entries)
                   or self.manifest.get("settings") != asdict(self.settings)
                   or [x["identity"] for x in self.manifest.get("branches", previous)]
                   != [b.identity for b in self.branches]
                   or len(self.scales) != len(self.branches))
        if (changed or force_threshold) and (ok.rows or self.store.exists()):
            self._update_threshold_and_save()

    def _refresh_knn(self) -> None:
        for branch in self.branches:
            branch.refresh_knn()

    # --------------------------------------------------------------- scoring
    def _branch_map(self, dist: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
        return input_res_map(dist, grid, input_size, self.settings.blur_sigma)

    def _map_score(self, amap: np.ndarray) -> float:
        mask = self._mask_at((amap.shape[1], amap.shape[0]))
        return image_score(amap, mask, self.settings.score_stat, self.settings.score_percentile)

    def _mask_at(self, size: tuple[int, int]) -> np.ndarray | None:
        """The ROI mask resized to (w, h), computed once per size (ROIs of a station share sizes)."""
        if size not in self._mask_cache:
            if len(self._mask_cache) >= 32:  # ROIs of varying size: keep the memory bounded
                self._mask_cache.clear()
            self._mask_cache[size] = resize_mask(self.mask, size)
        return self._mask_cache[size]

    def _nuisance_maps(self) -> list[list[np.ndarray]]:
        """Branch maps of copies of the one OK sample with a station's usual nuisance (thresholds.py)."""
        rec = self.store.list_samples("ok")[-1]
        img = self._records_images([rec])[0]
        last = self._emb["ok"].entries[-1]
        views = nuisance_views(img, self.extractor.stride * img.size[0] / last["input_size"][0])
        out = []
        for emb in self.embed(views):
            out.append([self._branch_map(branch.search(emb.feats[b]), emb.grids[b], emb.input_size)
                        for b, branch in enumerate(self.branches)])
        return out

    def _update_threshold_and_save(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        ok_scores, ng_scores = [], []
        if self._knn is not None:
            arrays = {"ok": self._arrays("ok"), "ng": self._arrays("ng")}
            ok_scores, ng_scores, self.scales = self._scorer.round(self.branches, s.holdout_max, arrays,
                                                                   self._nuisance_maps)
            log.debug("%s/%s: threshold samples scored in %.0f ms", self.store.role_id, self.store.roi_id,
                      (time.perf_counter() - t0) * 1000)
        if self.manifest["threshold"]["method"] == "manual_override":
            th = self.manifest["threshold"]
        else:
            th = self.threshold_policy().decide(ok_scores, ng_scores)
        ok = self._emb["ok"]
        m = self.manifest
        m.update(version=m["version"] + 1, backbone=self.identity, settings=asdict(s), threshold=th,
                 bank_key=s.bank_key(), bank_rows_total=ok.rows, ok_scores=[round(x, 6) for x in ok_scores],
                 ng_scores=[round(x, 6) for x in ng_scores], updated_utc=utc_now(), branches=self._branch_info(),
                 branch_scales=[x.to_dict() for x in self.scales])
        m["counts"] = {"ok": len(ok.entries), "ng": len(self._emb["ng"].entries),
                       "bank": len(self.bank), "patches": ok.rows}
        self.store.write_manifest(m)

    # --------------------------------------------------------------- public
    def _check_space(self, samples: list[tuple[bytes, ImageInput, dict]]) -> None:
        """Refuse a fit before writing anything when the data root cannot hold its files (disk_full):
        the images, their embedding rows, the rewritten bank and manifest, and 1 MB to spare."""
        self.store.root.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.store.root.parent).free
        rows = 0
        for _, img, _ in samples:
            w, h = self.extractor.input_size(*img.size)
            rows += (w // self.extractor.stride) * (h // self.extractor.stride)
        bank = sum(b.bank_path.stat().st_size for b in self.branches if b.bank_path.exists())
        dims = sum(ident.feature_dim for ident in self.extractor.branch_identities)  # over-estimate: coarse grids
        need = sum(len(d) for d, _, _ in samples) + rows * dims * 4 + 2 * bank + (1 << 20)
        if free < need:
            raise StorageError(f"the data root has {free // 1024} KiB free; storing these {len(samples)} samples needs "
                               f"about {need // 1024} KiB: nothing was stored", code="disk_full")

    def _store_samples(self, kind: str, samples: list[tuple[bytes, ImageInput, dict]]) -> tuple[list, list, list]:
        """-> (new records, their images, the sample id of each input that was already stored). Each input's
        outcome, in input order, is kept in `self.last_outcomes`: (sample_id, stored now)."""
        self._check_space(samples)
        self.last_outcomes: list[tuple[str, bool]] = []
        if kind not in self._known:  # read from the sample JSONs once; this model is their only writer
            self._known[kind] = self.store.known_hashes(kind)
        known = self._known[kind]
        records, images, duplicates = [], [], []
        for data, img, meta in samples:
            self.progress()  # each sample is written and fsynced: a long upload must not look hung
            sha = hashlib.sha256(data).hexdigest()  # computed once: dedupe here, recorded by save_sample
            if sha in known:
                duplicates.append(known[sha])
                self.last_outcomes.append((known[sha], False))
                continue
            rec = self.store.save_sample(kind, data, img.format, {"mm_per_px": img.mm_per_px, **meta}, sha=sha)
            known[sha] = rec.sample_id
            self.last_outcomes.append((rec.sample_id, True))
            records.append(rec)
            images.append(img)
        return records, images, duplicates

    def fit_ok(self, samples: list[tuple[bytes, ImageInput, dict]], finalize: bool = True) -> dict:
        """Store OK samples (image bytes + JSON), extend the bank, update the threshold.

        Large sets can be fed in chunks with finalize=False and one `finalize()` at the end, so that
        the threshold (leave-one-out scoring) is computed once.
        """
        t0 = time.perf_counter()
        records, images, duplicates = self._store_samples("ok", samples)
        t_backbone = t_coreset = 0.0
        bs = max(1, self.settings.fit_batch_size)
        for start in range(0, len(records), bs):
            recs, imgs = records[start : start + bs], images[start : start + bs]
            tb = time.perf_counter()
            spans = self._append_embeddings("ok", recs, imgs)
            tc = time.perf_counter()
            for branch, data, branch_spans in zip(self.branches, self._arrays("ok"), spans, strict=True):
                branch.extend_bank(data, branch_spans, self.progress)
            t_backbone += tc - tb
            t_coreset += time.perf_counter() - tc
        if records:
            for branch in self.branches:
                branch.save_bank()
            self._dirty = True
        tt = time.perf_counter()
        if finalize:
            self.finalize()
        t_threshold = time.perf_counter() - tt
        report = {"added": [r.sample_id for r in records], "duplicates": duplicates,
                  "stored": [new for _, new in self.last_outcomes], **self.state(),
                  "timings_ms": {"embed": round(t_backbone * 1000, 1), "coreset": round(t_coreset * 1000, 1),
                                 "threshold": round(t_threshold * 1000, 1),
                                 "total": round((time.perf_counter() - t0) * 1000, 1)}}
        log.info("fit_ok %s/%s: +%d samples (%d duplicates), banks %s, threshold %s, device %s, timings %s",
                 self.store.role_id, self.store.roi_id, len(records), len(duplicates),
                 [len(b.bank) for b in self.branches], self.threshold, self.extractor.device, report["timings_ms"])
        return report

    def finalize(self) -> None:
        """After fit_ok(finalize=False) calls: rebuild the search index, threshold and manifest."""
        if self._dirty:
            self._refresh_knn()
            self._update_threshold_and_save()
            self._dirty = False

    def send_ng(self, samples: list[tuple[bytes, ImageInput, dict]]) -> dict:
        """Store NG calibration samples and recalibrate the threshold (policy auto)."""
        t0 = time.perf_counter()
        records, images, duplicates = self._store_samples("ng", samples)
        t1 = t2 = time.perf_counter()
        if records:
            self._append_embeddings("ng", records, images)
            t2 = time.perf_counter()
            if self._knn is not None:
                self._update_threshold_and_save()
            else:
                self.manifest["counts"]["ng"] = len(self._emb["ng"].entries)
                self.store.write_manifest(self.manifest)
        t3 = time.perf_counter()
        timings = {"embed": round((t2 - t1) * 1000, 1), "threshold": round((t3 - t2) * 1000, 1),
                   "total": round((t3 - t0) * 1000, 1)}
        log.info("send_ng %s/%s: +%d samples (%d duplicates), threshold %s, timings %s", self.store.role_id,
                 self.store.roi_id, len(records), len(duplicates), self.threshold, timings)
        return {"added": [r.sample_id for r in records], "duplicates": duplicates,
                "stored": [new for _, new in self.last_outcomes], **self.state(), "timings_ms": timings}

    def set_threshold(self, value: float | None) -> dict:
        """Manual override (value) or back to the configured policy (None)."""
        return self.calibrate("manual" if value is not None else "config", value)

    def calibrate(self, policy: str | None = None, value: float | None = None, ok_percentile: float | None = None,
                  ng_margin: float | None = None, ng_recall: float | None = None) -> dict:
        """Recompute the threshold from the stored OK/NG samples.

        policy None: again with the current policy (e.g. after new NG samples); "auto" (NG-calibrated
        when NG samples exist, else OK percentile) or "ok_only", optionally with their parameters, kept
        for later fits; "manual" with `value`: a fixed override; "config": back to the configured policy.
        """
        if policy not in CALIBRATION_POLICIES:
            raise InputError(f"policy must be one of {', '.join(p for p in CALIBRATION_POLICIES if p)}, got {policy!r}",
                             code="invalid_policy")
        if ok_percentile is not None and not 0 < ok_percentile <= 100:
            raise InputError(f"ok_percentile must be in (0, 100], got {ok_percentile}", code="invalid_policy")
        if ng_margin is not None and not 0 <= ng_margin <= 1:
            raise InputError(f"ng_margin must be in [0, 1], got {ng_margin}", code="invalid_policy")
        if ng_recall is not None and not 0 < ng_recall <= 1:
            raise InputError(f"ng_recall must be in (0, 1], got {ng_recall}", code="invalid_policy")
        if policy == "manual":
            if value is None or not math.isfinite(value) or value <= 0:
                raise InputError(f"threshold must be a finite number > 0, got {value}", code="invalid_threshold")
            self.manifest["threshold"] = {"value": float(value), "method": "manual_override", "details": {}}
        elif policy is not None:
            self.manifest["threshold"] = {"value": None, "method": "none", "details": {}}
            self.manifest.pop("policy_override", None)
            if policy != "config":
                over = {"policy": policy, "ok_percentile": ok_percentile, "ng_margin": ng_margin,
                        "ng_recall": ng_recall}
                self.manifest["policy_override"] = {k: v for k, v in over.items() if v is not None}
        if self._knn is None and policy != "manual":
            raise ModelNotReadyError(
                f"ROI {self.store.role_id}/{self.store.roi_id} has no fitted model: send fit_ok samples first")
        self._update_threshold_and_save()
        return self.state()

    def policy(self) -> dict:
        return policy_of(self.manifest)

    def threshold_policy(self) -> thresholds.ThresholdPolicy:
        """The config's policy, with what a calibrate request set (it outlives later fits)."""
        s = self.settings
        over = self.manifest.get("policy_override") or {}
        if s.threshold_policy == "manual" and not over:
            return thresholds.ThresholdPolicy("manual", manual_value=s.threshold_value)
        return thresholds.ThresholdPolicy(over.get("policy", s.threshold_policy),
                                          over.get("ok_percentile", s.ok_percentile),
                                          over.get("ng_margin", s.ng_margin), over.get("ng_recall", s.ng_recall))

    def set_mask(self, png: bytes) -> dict:
        mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
        if mask is None or not (mask > 0).any():
            raise InputError("mask must be a PNG with non-zero pixels where anomalies count", code="invalid_mask")
        self.store.save_mask(png)
        self.manifest.pop("mask_error", None)
        self.mask = mask > 0
        self._mask_cache.clear()
        self._scorer.clear()  # scores depend on the mask
        if self._knn is not None:
            self._update_threshold_and_save()
        return self.state()

    def predict(self, images: list[ImageInput], heatmap: bool = False, return_map: bool = False,
                preview_px: int = 0) -> list[dict]:
        """Score images (batched by size); one result dict per image, in order.

        preview_px > 0 adds `preview`: a thumbnail of the image, map and mask (heatmap.thumbnail) so a
        heatmap can be drawn later without the cost of a full-size one on every prediction.
        """
        if self._knn is None or self.threshold is None:
            raise ModelNotReadyError(
                f"ROI {self.store.role_id}/{self.store.roi_id} has no fitted model: send fit_ok samples first")
        if [i.to_dict() for i in self.extractor.branch_identities] != [b.identity for b in self.branches]:
            raise BackboneMismatchError("the running backbone differs from the one this bank was built with")
        results = []
        for img, emb in zip(images, self.embed(images), strict=True):
            t0 = time.perf_counter()
            dists = [branch.search(emb.feats[b]) for b, branch in enumerate(self.branches)]
            t1 = time.perf_counter()
            maps = [self._branch_map(d, emb.grids[b], emb.input_size) for b, d in enumerate(dists)]
            score = fuse_scores([self._map_score(m) for m in maps], self.scales)
            amap = fuse_maps(maps, self.scales)
            threshold = float(self.threshold)
            full = cv2.resize(amap, img.size, interpolation=cv2.INTER_LINEAR)
            mask_full = self._mask_at(img.size)
            count, regions = defect_regions(full, threshold, mask_full, img.mm_per_px, self.settings.min_defect_area_px)
            is_anomaly = score > threshold
            png = render_heatmap(img.rgb, full, threshold, mask_full) if heatmap or self.debug_dir else None
            t2 = time.perf_counter()
            timings = {"preprocess": emb.timings["preprocess"], "backbone": emb.timings["backbone"],
                       "knn": (t1 - t0) * 1000, "postprocess": (t2 - t1) * 1000}
            total_px = sum(d.area_px for d in regions)
            res = {
                "is_anomaly": bool(is_anomaly), "score": round(score, 6), "threshold": round(threshold, 6),
                "threshold_method": self.manifest["threshold"]["method"],
                "inference_ms": round(sum(timings.values()), 2),
                "timings_ms": {k: round(v, 2) for k, v in timings.items()},
                "batch_size": emb.timings["batch_size"], "device": str(self.extractor.device),
                "model_version": self.version, "backbone": self.identity["name"],
                "mm_per_px": img.mm_per_px, "scale": img.scale, "image_size": list(img.size),
                "defects": {"count": count if is_anomaly else 0,
                            "total_area_px": total_px if is_anomaly else 0,
                            "total_area_mm2": (round(total_px * img.mm_per_px**2, 6)
                                               if img.mm_per_px and is_anomaly else (0.0 if img.mm_per_px else None)),
                            "regions": [d.to_dict() for d in regions] if is_anomaly else []},
            }
            if png is not None and heatmap:
                res["heatmap_png"] = png
            if return_map:
                res["anomaly_map"] = full
            if preview_px:
                res["preview"] = thumbnail(img.rgb, full, mask_full, preview_px)
            if png is not None and self.debug_dir is not None:
                self._save_debug(png, res)
            results.append(res)
        return results

    def _save_debug(self, png: bytes, res: dict) -> None:
        d = self.debug_dir / self.store.role_id / self.store.roi_id  # type: ignore[operator]
        d.mkdir(parents=True, exist_ok=True)
        stamp = utc_now().replace(":", "").replace("-", "")
        (d / f"{stamp}_{'NG' if res['is_anomaly'] else 'OK'}_{res['score']:.4f}.png").write_bytes(png)
