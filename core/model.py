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
from .bank_distances import BankDistances
from .errors import AnomalyError, BackboneMismatchError, InputError, ModelNotReadyError, StorageError
from .heatmap import render_heatmap, thumbnail
from .image_io import ImageInput, decode_image
from .knn import NearestNeighbour
from .memory_bank import CoresetSize, MemoryBank
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
    feats: np.ndarray  # [n, D] float32
    grid: tuple[int, int]
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
    """Memory bank, threshold and stored samples of one ROI. Not thread-safe: one worker owns it."""

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
        self.bank = MemoryBank(extractor.feature_dim, self.settings.coreset_size(), self.settings.proj_dim)
        self.manifest = self.store.read_manifest() or self._new_manifest()
        self.mask, mask_error = self.store.load_mask()
        self._mask_cache: dict[tuple[int, int], np.ndarray | None] = {}
        self._knn: NearestNeighbour | None = None
        self._bank_sample: np.ndarray = np.zeros(0, np.int64)
        self._emb = {kind: self.store.embeddings(kind) for kind in ("ok", "ng")}
        self._dirty = False
        self._known: dict[str, dict[str, str]] = {}  # sha256 -> sample_id per kind, for deduplication
        self._distances = BankDistances()  # threshold samples' patch distances, updated by bank deltas
        t0 = time.perf_counter()
        if mask_error:
            self.manifest["mask_error"] = mask_error
        self._sync_index(force_threshold=bool(mask_error))
        log.info("ROI %s/%s loaded: %d OK, %d NG samples, bank %d patches, threshold %s (%.0f ms)",
                 role_id, roi_id, self.manifest["counts"]["ok"], self.manifest["counts"]["ng"],
                 self.bank_rows.size, self.manifest["threshold"]["value"], (time.perf_counter() - t0) * 1000)

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

    def state(self) -> dict:
        return manifest_state(self.manifest, self.mask is not None)

    # ------------------------------------------------------------ embeddings
    def embed(self, images: list[ImageInput]) -> list[Embedded]:
        """Backbone features of images, batched by size (fit_batch_size per forward)."""
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
                feats, grid = self.extractor.forward(batch)
                if feats.device.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                input_size = (batch.shape[3], batch.shape[2])
                feats_np = feats.cpu().numpy()
                per = {"preprocess": (t1 - t0) * 1000 / len(chunk), "backbone": (t2 - t1) * 1000 / len(chunk),
                       "batch_size": len(chunk)}
                for j, i in enumerate(chunk):
                    out[i] = Embedded(feats_np[j], grid, input_size, size, dict(per))
        return out  # type: ignore[return-value]

    def _records_images(self, records: list[SampleRecord]) -> list[ImageInput]:
        return [decode_image(r.image_path.read_bytes(), mm_per_px=r.meta.get("mm_per_px"),
                             max_bytes=1 << 62, max_decode_pixels=1 << 62) for r in records]

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

    def _index_array(self, kind: str) -> np.ndarray:
        """The embedding rows of one kind: in RAM (memory_fit, bounded by memory_fit_max_mb) or memory-mapped."""
        return self._emb[kind].array(self.settings.memory_fit, self.settings.memory_fit_max_mb)

    def _reset_index(self, kind: str) -> None:
        """Empty one embedding index (other backbone, stale rows): its rows get new meanings."""
        self._emb[kind].reset(self.identity, self.extractor.feature_dim)
        self._distances.clear()

    def _append_embeddings(
        self, kind: str, records: list[SampleRecord], images: list[ImageInput]
    ) -> list[tuple[int, int]]:
        """Embed and append; returns (offset, count) row spans of the new samples."""
        store = self._emb[kind]
        if store.meta["identity"] != self.identity:
            self._reset_index(kind)
        items, spans, offset = [], [], store.rows
        for emb, rec in zip(self.embed(images), records, strict=True):
            entry = {"sample_id": rec.sample_id, "grid": list(emb.grid), "input_size": list(emb.input_size),
                     "image_size": list(emb.image_size)}
            items.append((entry, emb.feats))
            spans.append((offset, emb.feats.shape[0]))
            offset += emb.feats.shape[0]
        store.append(items)
        return spans

    # ------------------------------------------------------------ the index
    def _sync_index(self, force_threshold: bool = False) -> None:
        """Make the embedding index and bank match the stored samples and this backbone."""
        for kind in ("ok", "ng"):
            records = self._readable_samples(kind)
            store = self._emb[kind]
            indexed = [e["sample_id"] for e in store.entries]
            ids = [r.sample_id for r in records]
            if store.meta["identity"] != self.identity or indexed != ids[: len(indexed)]:
                if records:
                    log.warning("%s/%s: %s index stale (backbone or samples changed): rebuilding from %d samples",
                                self.store.role_id, self.store.roi_id, kind, len(records))
                self._reset_index(kind)
                indexed = []
                if kind == "ok":
                    self.store.bank_path.unlink(missing_ok=True)
            missing = records[len(indexed):]
            if missing:
                log.info("%s/%s: indexing %d %s samples", self.store.role_id, self.store.roi_id, len(missing), kind)
                for start in range(0, len(missing), 64):
                    chunk, images = self._decodable(kind, missing[start : start + 64])
                    if chunk:
                        self._append_embeddings(kind, chunk, images)
        ok = self._emb["ok"]
        bank = self.store.load_bank()
        manifest_ok = (self.manifest.get("backbone") == self.identity
                       and self.manifest.get("bank_key") == self.settings.bank_key()
                       and self.manifest.get("bank_rows_total") == ok.rows)
        if (bank is not None and manifest_ok and bank[1].shape == (bank[0].size, ok.meta["dim"])
                and (bank[0].size == 0 or bank[0].max() < ok.rows)):
            self._set_bank(*bank)
        else:
            self._reselect()
        self._refresh_knn()
        changed = (self.manifest["counts"]["ok"] != len(ok.entries) or self.manifest["backbone"] != self.identity
                   or self.manifest["counts"]["ng"] != len(self._emb["ng"].entries)
                   or self.manifest.get("settings") != asdict(self.settings))
        if (changed or force_threshold) and (ok.rows or self.store.exists()):
            self._update_threshold_and_save()

    def _reselect(self) -> None:
        """Select the bank from scratch by streaming the stored embeddings sample by sample."""
        store = self._emb["ok"]
        data = self._index_array("ok")
        self._set_bank(np.zeros(0, np.int64))
        for e in store.entries:
            self.progress()
            lo, hi = e["offset"], e["offset"] + e["count"]
            self.bank.extend(np.asarray(data[lo:hi]), lo, total_rows=hi)
        if store.entries:  # a ROI nobody has fitted leaves nothing on disk
            log.info("%s/%s: bank selected from %d samples: %d patches", self.store.role_id, self.store.roi_id,
                     len(store.entries), self.bank_rows.size)
            self.store.save_bank(self.bank_rows, self._bank_feats.numpy())

    def _set_bank(self, rows: np.ndarray, feats: np.ndarray | None = None) -> None:
        """Bank rows (order kept) plus their features (given, or gathered from the index)."""
        if feats is None:
            data = self._index_array("ok")
            feats = np.asarray(data[rows], np.float32) if rows.size else np.zeros((0, data.shape[1]), np.float32)
        self.bank.set(rows, feats)

    @property
    def bank_rows(self) -> np.ndarray:
        return self.bank.rows

    @property
    def _bank_feats(self) -> torch.Tensor:
        return self.bank.feats

    def _refresh_knn(self) -> None:
        store = self._emb["ok"]
        if self.bank_rows.size == 0:
            self._knn = None
            self._bank_sample = np.zeros(0, np.int64)
            return
        self._knn = NearestNeighbour(self._bank_feats.to(self.extractor.device), self.settings.knn_backend)
        self._bank_sample = self.bank.owners(np.asarray([e["offset"] for e in store.entries], np.int64))

    # --------------------------------------------------------------- scoring
    def _score_map(
        self, dist: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int]
    ) -> tuple[float, np.ndarray]:
        amap = input_res_map(dist, grid, input_size, self.settings.blur_sigma)
        mask = self._mask_at(input_size)
        return image_score(amap, mask, self.settings.score_stat, self.settings.score_percentile), amap

    def _mask_at(self, size: tuple[int, int]) -> np.ndarray | None:
        """The ROI mask resized to (w, h), computed once per size (ROIs of a station share sizes)."""
        if size not in self._mask_cache:
            if len(self._mask_cache) >= 32:  # ROIs of varying size: keep the memory bounded
                self._mask_cache.clear()
            self._mask_cache[size] = resize_mask(self.mask, size)
        return self._mask_cache[size]

    def _holdout_ok_scores(self) -> list[float]:
        """Leave-one-out scores of the most recent OK samples against the bank without their own patches."""
        store = self._emb["ok"]
        entries = store.entries
        if self._knn is None or not entries:
            return []
        data = self._index_array("ok")
        scores = []
        first = max(0, len(entries) - self.settings.holdout_max)
        for i in range(first, len(entries)):
            self.progress()
            exclude = torch.from_numpy(self._bank_sample == i)
            if bool(exclude.all()):
                continue
            scores.append(self._sample_score("ok", entries[i], data, exclude))
        if not scores:  # a single OK sample: nothing to leave out; score nuisance views of it instead
            rec = self.store.list_samples("ok")[-1]
            img = self._records_images([rec])[0]
            views = nuisance_views(img, self.extractor.stride * img.size[0] / entries[-1]["input_size"][0])
            for emb in self.embed(views):
                dist = self._knn.distances(torch.from_numpy(emb.feats).to(self.extractor.device)).numpy()
                scores.append(self._score_map(dist, emb.grid, emb.input_size)[0])
        return scores

    def _ng_scores(self) -> list[float]:
        store = self._emb["ng"]
        if self._knn is None or not store.entries:
            return []
        data = self._index_array("ng")
        out = []
        for e in store.entries:
            self.progress()
            out.append(self._sample_score("ng", e, data, None))
        return out

    def _sample_score(self, kind: str, e: dict, data: np.ndarray, exclude: torch.Tensor | None) -> float:
        """A stored sample's score, from its cached patch distances brought up to date with the bank."""
        q = torch.from_numpy(np.array(data[e["offset"] : e["offset"] + e["count"]])).to(self.extractor.device)
        grid, size = tuple(e["grid"]), tuple(e["input_size"])
        return self._distances.score((kind, e["sample_id"]), q, exclude,
                                     lambda dist: self._score_map(dist, grid, size)[0])

    def _update_threshold_and_save(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        if self._knn is not None:
            self._distances.begin(self._knn, self.bank_rows, self._bank_feats)
        ok_scores = self._holdout_ok_scores()
        ng_scores = self._ng_scores()
        if self._knn is not None:
            log.debug("%s/%s: threshold samples scored in %.0f ms: %s", self.store.role_id, self.store.roi_id,
                      (time.perf_counter() - t0) * 1000, self._distances.end())
        if self.manifest["threshold"]["method"] == "manual_override":
            th = self.manifest["threshold"]
        else:
            th = self.threshold_policy().decide(ok_scores, ng_scores)
        ok = self._emb["ok"]
        m = self.manifest
        m.update(version=m["version"] + 1, backbone=self.identity, settings=asdict(s), threshold=th,
                 bank_key=s.bank_key(), bank_rows_total=ok.rows, ok_scores=[round(x, 6) for x in ok_scores],
                 ng_scores=[round(x, 6) for x in ng_scores], updated_utc=utc_now())
        m["counts"] = {"ok": len(ok.entries), "ng": len(self._emb["ng"].entries),
                       "bank": int(self.bank_rows.size), "patches": ok.rows}
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
        bank = self.store.bank_path.stat().st_size if self.store.bank_path.exists() else 0
        need = sum(len(d) for d, _, _ in samples) + rows * self.extractor.feature_dim * 4 + 2 * bank + (1 << 20)
        if free < need:
            raise StorageError(f"the data root has {free // 1024} KiB free; storing these {len(samples)} samples needs "
                               f"about {need // 1024} KiB: nothing was stored", code="disk_full")

    def _store_samples(self, kind: str, samples: list[tuple[bytes, ImageInput, dict]]) -> tuple[list, list, list]:
        self._check_space(samples)
        if kind not in self._known:  # read from the sample JSONs once; this model is their only writer
            self._known[kind] = self.store.known_hashes(kind)
        known = self._known[kind]
        records, images, duplicates = [], [], []
        for data, img, meta in samples:
            sha = hashlib.sha256(data).hexdigest()  # computed once: dedupe here, recorded by save_sample
            if sha in known:
                duplicates.append(known[sha])
                continue
            rec = self.store.save_sample(kind, data, img.format, {"mm_per_px": img.mm_per_px, **meta}, sha=sha)
            known[sha] = rec.sample_id
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
        ok = self._emb["ok"]
        if ok.meta["identity"] != self.identity:
            self._reset_index("ok")
        bs = max(1, self.settings.fit_batch_size)
        for start in range(0, len(records), bs):
            recs, imgs = records[start : start + bs], images[start : start + bs]
            tb = time.perf_counter()
            spans = self._append_embeddings("ok", recs, imgs)
            tc = time.perf_counter()
            data = self._index_array("ok")
            for lo, count in spans:
                self.progress()
                self.bank.extend(np.asarray(data[lo : lo + count]), lo, total_rows=lo + count)
            t_backbone += tc - tb
            t_coreset += time.perf_counter() - tc
        if records:
            self.store.save_bank(self.bank_rows, self._bank_feats.numpy())
            self._dirty = True
        tt = time.perf_counter()
        if finalize:
            self.finalize()
        t_threshold = time.perf_counter() - tt
        report = {"added": [r.sample_id for r in records], "duplicates": duplicates, **self.state(),
                  "timings_ms": {"embed": round(t_backbone * 1000, 1), "coreset": round(t_coreset * 1000, 1),
                                 "threshold": round(t_threshold * 1000, 1),
                                 "total": round((time.perf_counter() - t0) * 1000, 1)}}
        log.info("fit_ok %s/%s: +%d samples (%d duplicates), bank %d, threshold %s, device %s, timings %s",
                 self.store.role_id, self.store.roi_id, len(records), len(duplicates), self.bank_rows.size,
                 self.threshold, self.extractor.device, report["timings_ms"])
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
        return {"added": [r.sample_id for r in records], "duplicates": duplicates, **self.state(),
                "timings_ms": timings}

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
        self._distances.clear()  # scores depend on the mask
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
        if self.extractor.identity.to_dict() != self.identity:
            raise BackboneMismatchError("the running backbone differs from the one this bank was built with")
        results = []
        for img, emb in zip(images, self.embed(images), strict=True):
            t0 = time.perf_counter()
            dist = self._knn.distances(torch.from_numpy(emb.feats).to(self.extractor.device)).numpy()
            t1 = time.perf_counter()
            score, amap = self._score_map(dist, emb.grid, emb.input_size)
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
