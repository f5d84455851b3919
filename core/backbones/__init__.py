"""Backbones producing L2-normalised patch features for PatchCore.

`get_extractor()` returns one cached, warmed-up instance per (name, weights, resolution, device)
in the process. Every extractor has an `identity` that a memory bank records, so a bank is never
queried with the features of another backbone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from core.backbones import dinov2, efficientnet_lite
from core.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

EFFNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BACKBONES = ("auto", "dinov2_vits14", "dinov2_vits14_reg4", *EFFNETS)
# EfficientNet-Lite0 blocks tapped for PatchCore: end of stage 3 (stride 8) and of stage 5 (stride 16)
EFFNET_LAYERS = (4, 10)
DEFAULT_RESOLUTION = {"dinov2_vits14": 448, "dinov2_vits14_reg4": 448, "efficientnet_lite0": 320,
                      "efficientnet_lite1": 320, "efficientnet_lite2": 320}


def default_branches(name: str) -> tuple[tuple[int, ...], ...]:
    """Patch-feature branches by default: on EfficientNet-Lite, fine (ends of stages 3 + 5, stride 8)
    and coarse (ends of stages 5 + 6, stride 16): one forward pass, two banks (docs/benchmarks.md)."""
    if name not in EFFNETS:
        return ((),)
    ends = efficientnet_lite.stage_ends(name)
    return ((ends[2], ends[4]), (ends[4], ends[5]))


def default_branch_scales(name: str) -> tuple[float, ...]:
    """The input scale of each default branch (1: the backbone resolution)."""
    return tuple(DEFAULT_SCALES.get(name, ())) or (1.0,) * len(default_branches(name))


DEFAULT_SCALES: dict[str, tuple[float, ...]] = {}  # none below 1 by default (docs/benchmarks.md, scales)


def default_layers(name: str) -> tuple[int, ...]:
    """Blocks tapped by default: the ends of stages 3 and 5 (Lite0: 4, 10; Lite1/Lite2: 6, 14)."""
    if name not in EFFNETS:
        return EFFNET_LAYERS
    ends = efficientnet_lite.stage_ends(name)
    return (ends[2], ends[4])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class BackboneIdentity:
    name: str
    weights_sha256: str
    resolution: int
    keep_aspect: bool
    feature_dim: int

    def to_dict(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "resolution": self.resolution,
                "keep_aspect": self.keep_aspect, "feature_dim": self.feature_dim}


class FeatureExtractor:
    """Resize (aspect kept) + normalise + forward + L2-normalised patch features."""

    def __init__(
        self, name: str, model: torch.nn.Module, weights_sha256: str, resolution: int, device: torch.device,
        keep_aspect: bool = True, amp_dtype: torch.dtype | None = torch.float16,
        layers: tuple[int, ...] | None = None, extra_branches: tuple[tuple[int, ...], ...] = (),
        extra_scales: tuple[float, ...] = (),
    ) -> None:
        self.name = name
        layers = tuple(layers) if layers else default_layers(name)
        self.model = model.to(device)
        self.device = device
        self.resolution = resolution
        self.keep_aspect = keep_aspect
        self.amp_dtype = amp_dtype if device.type == "cuda" else None
        self.is_vit = name.startswith("dinov2")
        self.taps = () if self.is_vit else tuple(layers)
        self.stride = 14 if self.is_vit else efficientnet_lite.block_stride(min(self.taps), name)
        # ViT: sides multiples of the patch; CNN: of the deepest tapped stride, so every map aligns
        self.align = 14 if self.is_vit else efficientnet_lite.block_stride(max(self.taps), name)
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if self.is_vit else ((0.5,) * 3, (0.5,) * 3)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.feature_dim = 384 if self.is_vit else sum(efficientnet_lite.block_channels(i, name) for i in self.taps)
        plain = self.is_vit or self.taps == default_layers(name)
        ident_name = name if plain else f"{name}@{'-'.join(map(str, self.taps))}"
        self.identity = BackboneIdentity(ident_name, weights_sha256, resolution, keep_aspect, self.feature_dim)
        # further patch branches (EfficientNet only): (taps, identity) each; a branch with an input scale
        # below 1 sees the same image smaller (its own forward pass, (scale)^2 of the main one's pixels):
        # a defect that spans much of the ROI then fills a patch's receptive field
        self.extra_branches: list[tuple[tuple[int, ...], BackboneIdentity]] = []
        self.extra_scales: list[float] = []
        scales = tuple(extra_scales) + (1.0,) * (len(extra_branches) - len(extra_scales))
        for taps, scale in zip(() if self.is_vit else extra_branches, scales, strict=False):
            taps = tuple(sorted(taps))
            dim = sum(efficientnet_lite.block_channels(i, name) for i in taps)
            res = resolution if scale == 1.0 else int(round(resolution * scale))  # the identity: where it looks
            ident = BackboneIdentity(f"{name}@{'-'.join(map(str, taps))}", weights_sha256, res, keep_aspect, dim)
            self.extra_branches.append((taps, ident))
            self.extra_scales.append(float(scale))
        self._lock = threading.Lock()

    @property
    def branch_identities(self) -> list[BackboneIdentity]:
        return [self.identity] + [ident for _, ident in self.extra_branches]

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """Backbone input (w, h): about resolution^2 pixels, aspect kept, sides multiples of the patch."""
        if not self.keep_aspect:
            return self.resolution, self.resolution
        aspect = width / height
        w = self.resolution * math.sqrt(aspect)
        h = self.resolution / math.sqrt(aspect)
        a = self.align
        return max(a, int(round(w / a)) * a), max(a, int(round(h / a)) * a)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """List of HxWx3 float [0,1] images of one size -> normalised batch on the device."""
        h, w = images[0].shape[:2]
        iw, ih = self.input_size(w, h)
        resized = [
            cv2.resize(img, (iw, ih), interpolation=cv2.INTER_AREA if iw < w else cv2.INTER_LINEAR)
            for img in images
        ]
        batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(self.device, non_blocking=True)
        return (batch - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised batch -> (features [B, gh*gw, D] float32 L2-normalised, (gh, gw))."""
        with self._lock, torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            if self.is_vit:
                gh, gw = batch.shape[2] // 14, batch.shape[3] // 14
                feats = self.model(batch).float()
            else:
                maps = self.model.forward_blocks(batch, self.taps)
                return _patch_features(maps)
        return F.normalize(feats, dim=-1), (gh, gw)

    @torch.inference_mode()
    def forward_branches(self, batch: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Normalised batch -> (features, grid) of every branch (the first is `forward`'s), one pass."""
        if not self.extra_branches:
            return [self.forward(batch)]
        sets = [(self.taps, 1.0)] + [(taps, s) for (taps, _), s in zip(self.extra_branches, self.extra_scales,
                                                                       strict=True)]
        out: list = [None] * len(sets)
        with self._lock, torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            for scale in dict.fromkeys(s for _, s in sets):  # one pass per input scale, the full one first
                members = [i for i, (_, s) in enumerate(sets) if s == scale]
                union = tuple(sorted({t for i in members for t in sets[i][0]}))
                view = batch if scale == 1.0 else self._scaled(batch, scale, max(union))
                by_tap = dict(zip(union, self.model.forward_blocks(view, union), strict=True))
                for i in members:
                    out[i] = _patch_features([by_tap[t] for t in sets[i][0]])
        return out

    def _scaled(self, batch: torch.Tensor, scale: float, deepest: int) -> torch.Tensor:
        """The normalised batch at `scale` (antialiased), sides multiples of the deepest tap's stride."""
        a = efficientnet_lite.block_stride(deepest, self.name)
        h, w = batch.shape[2:]
        size = (max(a, int(round(h * scale / a)) * a), max(a, int(round(w * scale / a)) * a))
        return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)

    def extract(self, images: list[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.forward(self.preprocess(images))

    def warm_up(self) -> float:
        t0 = time.perf_counter()
        dummy = np.zeros((self.resolution, self.resolution, 3), np.float32)
        self.extract([dummy])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000


def _patch_features(maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Block maps (finest first) -> L2-normalised patch features [B, gh*gw, D] on the finest grid: each
    map 3x3-averaged (local context), resized to that grid, L2-normalised, weighted equally."""
    gh, gw = maps[0].shape[2:]
    parts = []
    for fmap in maps:
        fmap = F.avg_pool2d(fmap.float(), 3, stride=1, padding=1, count_include_pad=False)
        if fmap.shape[2:] != (gh, gw):
            fmap = F.interpolate(fmap, size=(gh, gw), mode="bilinear", align_corners=False)
        parts.append(F.normalize(fmap, dim=1) / math.sqrt(len(maps)))
    feats = torch.cat(parts, dim=1).flatten(2).transpose(1, 2)
    return F.normalize(feats, dim=-1), (gh, gw)


def resolve_backbone_name(name: str, weights: str | None) -> str:
    """'auto' -> DINOv2 when its weights are present, else EfficientNet-Lite0 (said plainly)."""
    if name != "auto":
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        return name
    try:
        dinov2.find_weights(weights)
        return "dinov2_vits14"
    except WeightsNotFoundError as exc:
        log.warning("backbone 'auto': DINOv2 weights not found, using EfficientNet-Lite0 (ImageNet). %s", exc)
        return "efficientnet_lite0"


def max_block(name: str) -> int:
    """Highest block number of an EfficientNet-Lite (auto: Lite0, the fallback)."""
    variant = name if name in EFFNETS else "efficientnet_lite0"
    return efficientnet_lite.stage_ends(variant)[-1]


_CACHE: dict[tuple, FeatureExtractor] = {}
_NETWORKS: dict[tuple, tuple[torch.nn.Module, str, threading.Lock]] = {}  # one loaded network, many extractors
_CACHE_LOCK = threading.Lock()


def get_extractor(
    name: str = "auto", weights: str | None = None, resolution: int | None = None, device: str = "auto",
    keep_aspect: bool = True, allow_download: bool = False, random_weights: bool = False,
    layers: tuple[int, ...] | None = None, branches: tuple[tuple[int, ...], ...] | None = None,
    scales: tuple[float, ...] | None = None,
) -> FeatureExtractor:
    """One cached, warmed-up extractor per configuration in this process."""
    name = resolve_backbone_name(name, weights)
    resolution = resolution or DEFAULT_RESOLUTION[name]
    dev = resolve_device(device)
    # branches: None = the default (one branch when `layers` is given); else the first is the primary
    if branches is None:
        branches, default_scales = ((tuple(layers),), (1.0,)) if layers else (default_branches(name),
                                                                             default_branch_scales(name))
        scales = scales or default_scales
    branches = tuple(tuple(sorted(b)) for b in branches if b) or ((),)
    scales = tuple(float(x) for x in (scales or ())) + (1.0,) * max(0, len(branches) - len(scales or ()))
    if scales[0] != 1.0 or not all(0.1 <= x <= 1.0 for x in scales):
        raise ValueError(f"branch scales must lie in 0.1..1 and the first be 1, got {scales}")
    layers = branches[0] or default_layers(name)
    key = (name, weights, resolution, str(dev), keep_aspect, random_weights, branches, scales[: len(branches)])
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        t0 = time.perf_counter()
        net_key = (name, weights, str(dev), random_weights)
        if net_key not in _NETWORKS:
            model, path = _load_network(name, weights, random_weights, allow_download)
            sha = "random-seed-0" if path is None else sha256_file(path)
            _NETWORKS[net_key] = (model, sha, threading.Lock())
            log.info("backbone %s loaded from %s (%.0f ms)", name, path or "random weights",
                     (time.perf_counter() - t0) * 1000)
        model, sha, lock = _NETWORKS[net_key]
        extractor = FeatureExtractor(name, model, sha, resolution, dev, keep_aspect, layers=tuple(layers),
                                     extra_branches=branches[1:], extra_scales=scales[1 : len(branches)])
        extractor._lock = lock  # extractors of one network take turns on it
        warm_ms = extractor.warm_up()
        log.info("backbone %s on %s at resolution %d, blocks %s (warm-up %.0f ms)", name, dev, resolution,
                 extractor.taps or "all", warm_ms)
        _CACHE[key] = extractor
        return extractor


def _load_network(name: str, weights: str | None, random_weights: bool,
                  allow_download: bool) -> tuple[torch.nn.Module, Path | None]:
    if name.startswith("dinov2"):
        reg = name.endswith("reg4")
        path = None if random_weights else dinov2.find_weights(weights, reg, allow_download)
        if random_weights:
            torch.manual_seed(0)
            model = dinov2.DinoV2ViT(registers=4 if reg else 0)
            for p in model.parameters():
                torch.nn.init.trunc_normal_(p, std=0.02)
            return model.eval(), None
        return dinov2.build_dinov2(path, reg), path
    path = None
    if not random_weights:
        path = Path(weights) if weights else efficientnet_lite.default_weights_path(name)
    return efficientnet_lite.build_efficientnet_lite(path, name), path
