"""Shared wiring for the CLI and the daemon: config -> extractor -> per-ROI models."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.drift import DriftTracker
from agent.process.limits import in_low_priority_thread
from core.backbones import FeatureExtractor, get_extractor
from core.drift import DriftSettings
from core.errors import AnomalyError, InputError, ModelNotReadyError, StorageError, WeightsNotFoundError
from core.ids import safe_text
from core.image_io import ImageInput, decode_image
from core.roi.importer import ImportLimits, import_roi
from core.roi.lifecycle import LifecycleSettings
from core.roi.manifest import ManifestWatch, unloadable_state
from core.roi.model import RoiModel
from core.storage import RoiStore, list_rois

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Runtime:
    """One extractor for the process and one RoiModel per (role_id, roi_id), opened on demand."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        b = cfg.backbone
        kw = {"layers": tuple(b.layers)} if b.layers else {}
        self.extractor: FeatureExtractor = get_extractor(
            b.name, str(b.weights) if b.weights else None, b.resolution, cfg.device, b.keep_aspect, b.allow_download,
            **kw)
        if b.name == "auto" and self.extractor.name == "efficientnet_lite0":
            log.warning("running on EfficientNet-Lite0 (ImageNet) because no DINOv2 weights were found; "
                        "see docs/configuration.md (backbone.weights) to use DINOv2")
        self._models: dict[tuple[str, str], RoiModel] = {}  # in order of last use (least recent first)
        self._used: dict[tuple[str, str], float] = {}
        self.progress: Callable[[], None] | None = None  # the worker's heartbeat, passed to every model
        self.lifecycle = LifecycleSettings(**cfg.lifecycle.model_dump())
        self.drift = DriftTracker(cfg.data_root, DriftSettings(**cfg.drift.model_dump()))
        # ROIs whose files could not be loaded -> {reason, then}; read by other threads (health, /models)
        self.unloadable: dict[tuple[str, str], dict] = {}
        self._watch = ManifestWatch(cfg.data_root)
        for state in self._watch.unusable():  # said at start, once: the ROI itself loads on its next request
            log.error("ROI %s/%s: %s; %s", state["role_id"], state["roi_id"], state["unloadable"]["reason"],
                      state["unloadable"]["then"])

    def model(self, role_id: str, roi_id: str, create: bool = True) -> RoiModel:
        """The ROI's model; create=False: ModelNotReadyError for a ROI never fitted (nothing made on disk)."""
        key = (role_id, roi_id)
        if key not in self._models and not create and not RoiStore(self.cfg.data_root, role_id, roi_id).exists():
            raise ModelNotReadyError(f"ROI {role_id}/{roi_id} has no fitted model: send fit_ok samples first")
        if key not in self._models:
            if create and not RoiStore(self.cfg.data_root, role_id, roi_id).exists():
                self._check_room(role_id, roi_id)
            while len(self._models) >= self.cfg.limits.max_loaded_rois:  # least recently used leaves memory
                old = next(iter(self._models))
                log.info("unloading ROI %s/%s (limits.max_loaded_rois %d reached)", *old,
                         self.cfg.limits.max_loaded_rois)
                self.forget(*old)
            self._models[key] = self._open(role_id, roi_id)
        self._models[key] = self._models.pop(key)  # most recently used last
        self._used[key] = time.monotonic()
        return self._models[key]

    def _open(self, role_id: str, roi_id: str) -> RoiModel:
        """Load a ROI from disk. Whatever its files hold, a failure stays this ROI's: it is recorded in
        `unloadable` (shown in /health, /models, the page and the state topic), logged at ERROR once per
        reason, and its requests are answered `roi_unloadable`; every other ROI goes on. A disk that cannot
        be written (OSError) is the worker's to answer (disk_full / storage_error)."""
        key = (role_id, roi_id)
        settings, _ = self.cfg.roi_settings(role_id, roi_id)
        try:
            model = RoiModel(self.cfg.data_root, role_id, roi_id, self.extractor_for(role_id, roi_id), settings,
                             progress=self.progress, lifecycle=self.lifecycle)
        except (OSError, StorageError, WeightsNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - any file content: the ROI is reported, never the agent stopped
            reason = safe_text(f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}", 400)
            if self.unloadable.get(key, {}).get("reason") != reason:
                log.exception("ROI %s/%s cannot be loaded (%s): its requests are answered roi_unloadable; the other "
                              "ROIs are served", role_id, roi_id, reason)
            self.unloadable[key] = unloadable_state(role_id, roi_id, reason)["unloadable"]
            raise AnomalyError(f"ROI {role_id}/{roi_id} cannot be loaded from its files: {reason}",
                               code="roi_unloadable") from None
        if self.unloadable.pop(key, None) is not None:
            log.warning("ROI %s/%s loads again", role_id, roi_id)
        return model

    def unloadable_states(self) -> list[dict]:
        """Every ROI that cannot be used now: its load failed, or its manifest fails its schema on disk."""
        found = {(s["role_id"], s["roi_id"]): s for s in self._watch.unusable()}
        for (role, roi), info in list(self.unloadable.items()):
            found[(role, roi)] = {"role_id": role, "roi_id": roi, "unloadable": info}
        return [found[k] for k in sorted(found)]

    def _check_room(self, role_id: str, roi_id: str) -> None:
        """A new ROI is refused once `limits.max_rois` ROIs exist on disk (each costs memory and disk)."""
        count = len(list_rois(self.cfg.data_root))
        if count >= self.cfg.limits.max_rois:
            raise InputError(f"ROI {role_id}/{roi_id} would be new, but {count} ROIs exist (limits.max_rois "
                             f"{self.cfg.limits.max_rois}): reuse a ROI id or raise the limit", code="too_many_rois")

    def unload_idle(self) -> list[tuple[str, str]]:
        """Free the models not used for `limits.idle_unload_s` (0: never); they load again on their next job."""
        idle_s = self.cfg.limits.idle_unload_s
        now = time.monotonic()
        gone = [k for k in self._models if idle_s and now - self._used.get(k, now) > idle_s]
        for key in gone:
            log.info("unloading ROI %s/%s: idle for over %.0f s (limits.idle_unload_s)", *key, idle_s)
            self.forget(*key)
        return gone

    def loaded_keys(self) -> list[tuple[str, str]]:
        """The loaded ROIs, least recently used first (the next to leave memory)."""
        return list(self._models)

    def loaded_count(self) -> int:
        return len(self._models)  # read from other threads (health): len() of a dict is atomic

    def extractor_for(self, role_id: str, roi_id: str) -> FeatureExtractor:
        """The ROI's own layers / resolution (config `rois:`), on the process's one loaded network."""
        layers, resolution = self.cfg.roi_features(role_id, roi_id)
        b = self.cfg.backbone
        if (layers or None) == (tuple(b.layers) if b.layers else None) and resolution == b.resolution:
            return self.extractor
        kw = {"layers": layers} if layers else {}
        return get_extractor(self.extractor.name, str(b.weights) if b.weights else None,
                             resolution or None, self.cfg.device, b.keep_aspect, b.allow_download, **kw)

    def forget(self, role_id: str, roi_id: str) -> None:
        """Drop a ROI's model from memory: the next request loads it again from what is on disk."""
        self._models.pop((role_id, roi_id), None)
        self._used.pop((role_id, roi_id), None)

    def heatmap_default(self, role_id: str, roi_id: str) -> bool:
        return self.cfg.roi_settings(role_id, roi_id)[1]

    def import_roi(self, source: bytes | Path, role_id: str | None, roi_id: str | None) -> dict:
        """A ROI archive verified within the configured limits (core/roi/importer.py); safe beside the worker:
        its samples are embedded here, in a thread of lowered priority (nice 10), before the new ROI appears
        in one rename, so its first request finds its index and no other ROI's parts wait behind the work."""
        lim = self.cfg.limits
        ex = self.extractor_for(role_id, roi_id) if role_id and roi_id else self.extractor
        limits = ImportLimits(int(lim.import_max_mb * 2**20), lim.import_max_files, lim.max_bytes, lim.max_rois)
        branches = [i.to_dict() for i in ex.branch_identities]

        def prepare(root: Path, role: str, roi: str) -> None:
            t0 = time.perf_counter()
            settings, _ = self.cfg.roi_settings(role, roi)
            RoiModel(root, role, roi, self.extractor_for(role, roi), settings, lifecycle=self.lifecycle)
            log.info("import of %s/%s: samples embedded in %.1f s (off the worker, nice %d)", role, roi,
                     time.perf_counter() - t0, os.getpriority(os.PRIO_PROCESS, 0))

        return in_low_priority_thread(import_roi, self.cfg.data_root, source, ex.identity.to_dict(), branches,
                                      role_id, roi_id, limits, check_image=self.decode, prepare=prepare)

    def decode(self, data: bytes, mm_per_px: object = None, roi: tuple[str, str] | None = None) -> ImageInput:
        """Decode within the configured limits; without an mm_per_px, the ROI's configured default (if any)."""
        if mm_per_px is None and roi is not None:
            mm_per_px = self.cfg.roi_mm_per_px(*roi)
        lim = self.cfg.limits
        ex = self.extractor_for(*roi) if roi is not None else self.extractor
        return decode_image(data, mm_per_px=mm_per_px, max_bytes=lim.max_bytes,
                            max_decode_pixels=lim.max_decode_pixels, max_pixels=lim.max_pixels,
                            min_side=self.extractor.stride, max_decoded_bytes=lim.max_decoded_bytes,
                            draft_for=ex.input_size)


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files as given; directories expand to their image files (sorted)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file()
                              and f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")))
        else:
            out.append(p)
    return out
