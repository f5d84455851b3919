"""The searchable part of a ROI's model: every patch branch's embedding index and coreset bank, made
from (and kept in step with) the stored samples."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from core.backbones import FeatureExtractor
from core.image_io import ImageInput
from core.method.branch import Branch
from core.method.patch_branch import PatchBranch
from core.roi.manifest import ModelSettings
from core.roi.sample_store import Sample, SampleStore
from core.storage import RoiStore, SampleRecord

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    feats: list[np.ndarray]  # per branch: [n, D_b] float32 (None: a branch not asked for, RoiIndex.embed `only`)
    grids: list[tuple[int, int]]  # per branch
    input_size: tuple[int, int]  # backbone input (w, h)
    image_size: tuple[int, int]  # ROI (w, h)
    timings: dict[str, float] = field(default_factory=dict)


class RoiIndex:
    """One PatchBranch per feature branch of the extractor (each: index of every OK/NG patch + bank)."""

    def __init__(self, store: RoiStore, extractor: FeatureExtractor, settings: ModelSettings,
                 progress: Callable[[], None]) -> None:
        self.store = store
        self.extractor = extractor
        self.settings = settings
        self.progress = progress
        idents = extractor.branch_identities
        s = settings
        # every further branch gets the first one's bank memory (entries x dims), not more: RAM <= 2x one bank
        self.branches: list[Branch] = [
            PatchBranch(store.index_dir, f"b{i}" if i else "", ident.to_dict(), ident.feature_dim,
                        s.coreset_size().scaled(idents[0].feature_dim / ident.feature_dim), s.proj_dim,
                        extractor.device, s.knn_backend)
            for i, ident in enumerate(idents)]

    def info(self) -> list[dict]:
        return [{"identity": b.identity, "bank_rows_total": b.emb["ok"].rows, "bank": len(b)}
                for b in self.branches]

    def matches_extractor(self) -> bool:
        return [i.to_dict() for i in self.extractor.branch_identities] == [b.identity for b in self.branches]

    def bytes_needed(self, samples: list[Sample]) -> int:
        """Disk a fit of these samples adds besides the images: index rows and a rewritten bank."""
        ex = self.extractor
        # each branch's patches per image: its stride at its input scale (rounding up: never an under-estimate)
        per_px = [(ex.identity.feature_dim, 1.0 / ex.stride)] + [
            (ident.feature_dim, scale / ex.spec.stride(taps))
            for (taps, ident), scale in zip(ex.extra_branches, ex.extra_scales, strict=True)]
        values = 0
        for _, img, _ in samples:
            w, h = ex.input_size(*img.size)
            values += sum(dim * (math.ceil(w * f) * math.ceil(h * f)) for dim, f in per_px)
        bank = sum(b.bank_path.stat().st_size for b in self.branches if b.bank_path.exists())
        return values * 4 + 2 * bank

    # ------------------------------------------------------------ embeddings
    def embed(self, images: list[ImageInput], only: Sequence[int] | None = None) -> list[Embedded]:
        """Backbone features of images for every branch (`only`: those branches, the others None), batched by
        size (fit_batch_size per forward)."""
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
                per_branch = self.extractor.forward_branches(batch, only)
                if batch.device.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                input_size = (batch.shape[3], batch.shape[2])
                arrays = [None if x is None else x[0].cpu().numpy() for x in per_branch]
                per = {"preprocess": (t1 - t0) * 1000 / len(chunk), "backbone": (t2 - t1) * 1000 / len(chunk),
                       "batch_size": len(chunk)}
                for j, i in enumerate(chunk):
                    out[i] = Embedded([None if a is None else a[j] for a in arrays],
                                      [None if x is None else x[1] for x in per_branch], input_size, size, dict(per))
        return [e for e in out if e is not None]  # every place was filled

    def arrays(self, kind: str) -> list[np.ndarray]:
        """Each branch's embedding rows of one kind: in RAM (memory_fit, bounded) or memory-mapped."""
        s = self.settings
        return [b.index_array(kind, s.memory_fit, s.memory_fit_max_mb) for b in self.branches]

    def append(self, kind: str, records: list[SampleRecord], images: list[ImageInput],
               branches: list[Branch] | None = None) -> list[list[tuple[int, int]]]:
        """Embed once and append to each branch; returns per branch the (offset, count) spans."""
        embs = self.embed(images)
        out = []
        for b, branch in enumerate(self.branches):
            if branches is not None and branch not in branches:
                out.append([])
                continue
            items = [({"sample_id": rec.sample_id, "grid": list(emb.grids[b]), "input_size": list(emb.input_size),
                       "image_size": list(emb.image_size)}, emb.feats[b])
                     for rec, emb in zip(records, embs, strict=True)]
            out.append(branch.append(kind, items))
        return out

    def extend_banks(self, records: list[SampleRecord], images: list[ImageInput]) -> tuple[float, float]:
        """Index new OK samples and extend each bank (coreset upkeep); -> (embed s, coreset s)."""
        t_backbone = t_coreset = 0.0
        bs = max(1, self.settings.fit_batch_size)
        for start in range(0, len(records), bs):
            tb = time.perf_counter()
            spans = self.append("ok", records[start : start + bs], images[start : start + bs])
            tc = time.perf_counter()
            for branch, data, branch_spans in zip(self.branches, self.arrays("ok"), spans, strict=True):
                branch.extend_bank(data, branch_spans, self.progress)
            t_backbone += tc - tb
            t_coreset += time.perf_counter() - tc
        if records:
            for branch in self.branches:
                branch.save_bank()
        return t_backbone, t_coreset

    def refresh_knn(self) -> None:
        for branch in self.branches:
            branch.refresh_knn()

    @property
    def ready(self) -> bool:
        """Every branch is fitted and searchable: the ROI can score."""
        return all(b.ready() for b in self.branches)

    def entries(self, kind: str) -> list[dict]:
        """The indexed samples of one kind, in order (every branch indexes the same samples)."""
        return self.branches[0].emb[kind].entries

    def rows(self, kind: str) -> int:
        return self.branches[0].emb[kind].rows

    def sample_ids(self) -> dict[str, list[str]]:
        return {kind: [e["sample_id"] for e in self.entries(kind)] for kind in ("ok", "ng")}

    # ------------------------------------------------------------------ sync
    def sync(self, samples: SampleStore, previous: list[dict], bank_key_matches: bool) -> None:
        """Make every branch's index and bank match the stored samples and the features; `previous`: the
        branches the manifest recorded (a bank is trusted only if its identity and row count agree)."""
        for kind in ("ok", "ng"):
            self.sync_kind(samples, kind)
        arrays = self.arrays("ok")
        for b, branch in enumerate(self.branches):
            before = previous[b] if b < len(previous) else {}
            trusted = (before.get("identity") == branch.identity and bank_key_matches
                       and before.get("bank_rows_total") == branch.emb["ok"].rows)
            if branch.load_or_reselect(arrays[b], trusted, self.progress) and branch.emb["ok"].entries:
                log.info("%s/%s: bank of branch %s selected from %d samples: %d patches", self.store.role_id,
                         self.store.roi_id, branch.identity["name"], len(branch.emb["ok"].entries), len(branch))
            branch.refresh_knn()

    def sync_kind(self, samples: SampleStore, kind: str) -> None:
        records = samples.readable(kind)
        ids = [r.sample_id for r in records]
        for branch in self.branches:
            dropped = branch.compact(kind, set(ids))
            if dropped:
                log.info("%s/%s: %d %s samples left the index of branch %s", self.store.role_id, self.store.roi_id,
                         len(dropped), kind, branch.identity["name"])
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
            chunk, images = samples.decodable(kind, missing[start : start + 64])
            runs: dict[tuple[int, ...], list[int]] = {}  # the branches that lack a sample -> its chunk places
            for j, rec in enumerate(chunk):
                todo = tuple(b for b, n in enumerate(done) if n <= position[rec.sample_id])
                runs.setdefault(todo, []).append(j)
            for todo, places in runs.items():
                self.append(kind, [chunk[j] for j in places], [images[j] for j in places],
                            [self.branches[b] for b in todo])
