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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from core.backbones import dinov2
from core.backbones.registry import BACKBONES, FALLBACK, REGISTRY, BackboneSpec, patch_features, spec_of
from core.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

EFFNETS = tuple(n for n, spec in REGISTRY.items() if spec.tappable)
DEFAULT_RESOLUTION = {name: spec.default_resolution for name, spec in REGISTRY.items()}
__all__ = ["BACKBONES", "REGISTRY", "BackboneIdentity", "FeatureExtractor", "get_extractor", "spec_of"]


def default_branches(name: str) -> tuple[tuple[int, ...], ...]:
    """Patch-feature branches by default (the spec's: on EfficientNet-Lite fine + coarse, one forward pass)."""
    return spec_of(name).default_branches() if name in REGISTRY else ((),)


def default_branch_scales(name: str) -> tuple[float, ...]:
    """The input scale of each default branch (1: the backbone resolution)."""
    return spec_of(name).default_scales() if name in REGISTRY else (1.0,)


def default_layers(name: str) -> tuple[int, ...]:
    """Blocks tapped by default: the ends of stages 3 and 5 (Lite0: 4, 10; Lite1/Lite2: 6, 14)."""
    spec = spec_of(name)
    return (spec if spec.tappable else REGISTRY[FALLBACK]).default_layers()


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
        extra_scales: tuple[float, ...] = (), lock: threading.Lock | None = None,
    ) -> None:
        self.name = name
        layers = tuple(layers) if layers else default_layers(name)
        self.model = model.to(device)
        self.device = device
        self.resolution = resolution
        self.keep_aspect = keep_aspect
        self.amp_dtype = amp_dtype if device.type == "cuda" else None
        self.spec: BackboneSpec = spec_of(name)
        spec = self.spec
        self.taps = tuple(layers) if spec.tappable else ()
        self.stride = spec.stride(self.taps)
        self.align = spec.align(self.taps)  # input sides multiples of this, so every map aligns
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self.feature_dim = spec.feature_dim(self.taps)
        plain = not spec.tappable or self.taps == default_layers(name)
        ident_name = name if plain else f"{name}@{'-'.join(map(str, self.taps))}"
        self.identity = BackboneIdentity(ident_name, weights_sha256, resolution, keep_aspect, self.feature_dim)
        # further patch branches (a tappable backbone only): (taps, identity) each; a branch with an input scale
        # below 1 sees the same image smaller (its own forward pass, (scale)^2 of the main one's pixels):
        # a defect that spans much of the ROI then fills a patch's receptive field
        self.extra_branches: list[tuple[tuple[int, ...], BackboneIdentity]] = []
        self.extra_scales: list[float] = []
        scales = tuple(extra_scales) + (1.0,) * (len(extra_branches) - len(extra_scales))
        for taps, scale in zip(extra_branches if spec.tappable else (), scales, strict=False):
            taps = tuple(sorted(taps))
            res = resolution if scale == 1.0 else int(round(resolution * scale))  # the identity: where it looks
            ident = BackboneIdentity(f"{name}@{'-'.join(map(str, taps))}", weights_sha256, res, keep_aspect,
                                     spec.feature_dim(taps))
            self.extra_branches.append((taps, ident))
            self.extra_scales.append(float(scale))
        # extractors of one loaded network (other resolutions, branches) take turns on it
        self._lock = lock or threading.Lock()

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
            return self.spec.features(self.model, batch, self.taps)

    @torch.inference_mode()
    def forward_branches(self, batch: torch.Tensor,
                         only: Sequence[int] | None = None) -> list[tuple[torch.Tensor, tuple[int, int]] | None]:
        """Normalised batch -> (features, grid) of every branch (the first is `forward`'s), one pass per input
        scale; `only`: the branches wanted (the others None, and a scale none of them needs is not run)."""
        if not self.extra_branches:
            return [self.forward(batch)]
        sets = [(self.taps, 1.0)] + [(taps, s) for (taps, _), s in zip(self.extra_branches, self.extra_scales,
                                                                       strict=True)]
        wanted = set(range(len(sets)) if only is None else only)
        out: list = [None] * len(sets)
        with self._lock, torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            for scale in dict.fromkeys(s for i, (_, s) in enumerate(sets) if i in wanted):  # the full scale first
                members = [i for i, (_, s) in enumerate(sets) if s == scale and i in wanted]
                union = tuple(sorted({t for i in members for t in sets[i][0]}))
                view = batch if scale == 1.0 else self._scaled(batch, scale, max(union))
                by_tap = dict(zip(union, self.spec.block_maps(self.model, view, union), strict=True))
                for i in members:
                    out[i] = patch_features([by_tap[t] for t in sets[i][0]])
        return out

    def _scaled(self, batch: torch.Tensor, scale: float, deepest: int) -> torch.Tensor:
        """The normalised batch at `scale` (antialiased), sides multiples of the deepest tap's stride."""
        a = self.spec.align((deepest,))
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


def resolve_backbone_name(name: str, weights: str | None) -> str:
    """'auto' -> DINOv2 when its weights are present, else EfficientNet-Lite0 (said plainly)."""
    if name != "auto":
        return spec_of(name).name
    try:
        dinov2.find_weights(weights)
        return "dinov2_vits14"
    except WeightsNotFoundError as exc:
        log.warning("backbone 'auto': DINOv2 weights not found, using EfficientNet-Lite0 (ImageNet). %s", exc)
        return FALLBACK


def max_block(name: str) -> int:
    """Highest block number of an EfficientNet-Lite (auto: Lite0, the fallback)."""
    spec = spec_of(name)
    return (spec if spec.tappable else REGISTRY[FALLBACK]).max_block()


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
            model, path = spec_of(name).load(weights, random_weights, allow_download)
            sha = "random-seed-0" if path is None else sha256_file(path)
            _NETWORKS[net_key] = (model, sha, threading.Lock())
            log.info("backbone %s loaded from %s (%.0f ms)", name, path or "random weights",
                     (time.perf_counter() - t0) * 1000)
        model, sha, lock = _NETWORKS[net_key]
        extractor = FeatureExtractor(name, model, sha, resolution, dev, keep_aspect, layers=tuple(layers),
                                     extra_branches=branches[1:], extra_scales=scales[1 : len(branches)], lock=lock)
        warm_ms = extractor.warm_up()
        log.info("backbone %s on %s at resolution %d, blocks %s (warm-up %.0f ms)", name, dev, resolution,
                 extractor.taps or "all", warm_ms)
        _CACHE[key] = extractor
        return extractor
