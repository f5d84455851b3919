"""Every backbone the agent can run, one spec each: what a new backbone must say, in one place.

A spec names the network, its default input resolution, its input normalisation, how its patch features
are made from the blocks it taps (a ViT: its last tokens; a CNN: chosen blocks, 3x3-averaged and fused on the
finest grid), the stride and width of those features, its default patch branches and how to load it.
`FeatureExtractor` (core/backbones/__init__.py) asks the spec and never the name; the config's
`backbone.name` choices are this registry's keys (agent/config.py). Adding a backbone: one module with the
network and its loader, one spec here (docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from core.backbones import dinov2, efficientnet_lite

Taps = tuple[int, ...]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class BackboneSpec(Protocol):
    name: str
    default_resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tappable: bool  # layers/branches/scales can be chosen (a CNN's blocks); False: one fixed feature set

    def default_branches(self) -> tuple[Taps, ...]: ...
    def default_scales(self) -> tuple[float, ...]: ...  # each default branch's input scale (1: the resolution)
    def default_layers(self) -> Taps: ...
    def max_block(self) -> int: ...
    def stride(self, taps: Taps) -> int: ...  # input pixels per patch of the features of `taps`
    def align(self, taps: Taps) -> int: ...  # input sides are multiples of this (every map aligns)
    def feature_dim(self, taps: Taps) -> int: ...
    def features(self, model: torch.nn.Module, batch: torch.Tensor,
                 taps: Taps) -> tuple[torch.Tensor, tuple[int, int]]: ...
    def block_maps(self, model: torch.nn.Module, batch: torch.Tensor, taps: Taps) -> list[torch.Tensor]: ...
    def load(self, weights: str | None, random_weights: bool,
             allow_download: bool) -> tuple[torch.nn.Module, Path | None]: ...


def patch_features(maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
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


@dataclass(frozen=True)
class DinoV2Spec:
    """DINOv2 ViT-S/14 (optionally with 4 registers): the last block's patch tokens, stride 14, 384 dims."""

    name: str
    registers: bool
    default_resolution: int = 448
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    tappable: bool = False

    def default_branches(self) -> tuple[Taps, ...]:
        return ((),)

    def default_scales(self) -> tuple[float, ...]:
        return (1.0,)

    def default_layers(self) -> Taps:
        return ()

    def max_block(self) -> int:
        return 0

    def stride(self, taps: Taps) -> int:
        return 14

    def align(self, taps: Taps) -> int:
        return 14

    def feature_dim(self, taps: Taps) -> int:
        return 384

    def features(self, model: torch.nn.Module, batch: torch.Tensor,
                 taps: Taps) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = (batch.shape[2] // 14, batch.shape[3] // 14)
        return F.normalize(model(batch).float(), dim=-1), grid

    def block_maps(self, model: torch.nn.Module, batch: torch.Tensor, taps: Taps) -> list[torch.Tensor]:
        raise ValueError(f"{self.name} has no selectable blocks")

    def load(self, weights: str | None, random_weights: bool,
             allow_download: bool) -> tuple[torch.nn.Module, Path | None]:
        if random_weights:  # seeded: the parity tests compare against a reference built the same way
            torch.manual_seed(0)
            model = dinov2.DinoV2ViT(registers=4 if self.registers else 0)
            for p in model.parameters():
                torch.nn.init.trunc_normal_(p, std=0.02)
            return model.eval(), None
        path = dinov2.find_weights(weights, self.registers, allow_download)
        return dinov2.build_dinov2(path, self.registers), path


@dataclass(frozen=True)
class EfficientNetLiteSpec:
    """EfficientNet-Lite0/1/2 (ImageNet): chosen blocks; by default four branches: fine (ends of stages 3 + 5,
    stride 8) and coarse (ends of stages 5 + 6, stride 16) from one forward pass, and coarse at 0.6 and at 0.4
    of the input scale from two smaller ones (together 0.52 of the first's pixels; docs/benchmarks.md)."""

    name: str
    default_resolution: int = 320
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tappable: bool = True

    def default_branches(self) -> tuple[Taps, ...]:
        ends = efficientnet_lite.stage_ends(self.name)
        return ((ends[2], ends[4]), (ends[4], ends[5]), (ends[4], ends[5]), (ends[4], ends[5]))

    def default_scales(self) -> tuple[float, ...]:
        """Fine and coarse at the resolution, coarse again at 0.6 and 0.4 of it (a large, low-contrast defect
        fills a coarse patch only in a smaller view); each ROI fuses the set its evidence favours
        (core/roi/tuning.py)."""
        return (1.0, 1.0, 0.6, 0.4)

    def default_layers(self) -> Taps:
        ends = efficientnet_lite.stage_ends(self.name)
        return (ends[2], ends[4])

    def max_block(self) -> int:
        return efficientnet_lite.stage_ends(self.name)[-1]

    def stride(self, taps: Taps) -> int:
        return efficientnet_lite.block_stride(min(taps), self.name)

    def align(self, taps: Taps) -> int:
        return efficientnet_lite.block_stride(max(taps), self.name)

    def feature_dim(self, taps: Taps) -> int:
        return sum(efficientnet_lite.block_channels(i, self.name) for i in taps)

    def features(self, model: torch.nn.Module, batch: torch.Tensor,
                 taps: Taps) -> tuple[torch.Tensor, tuple[int, int]]:
        return patch_features(self.block_maps(model, batch, taps))

    def block_maps(self, model: torch.nn.Module, batch: torch.Tensor, taps: Taps) -> list[torch.Tensor]:
        return model.forward_blocks(batch, taps)

    def load(self, weights: str | None, random_weights: bool,
             allow_download: bool) -> tuple[torch.nn.Module, Path | None]:
        path = None if random_weights else (Path(weights) if weights else
                                            efficientnet_lite.default_weights_path(self.name))
        return efficientnet_lite.build_efficientnet_lite(path, self.name), path


REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    DinoV2Spec("dinov2_vits14", registers=False),
    DinoV2Spec("dinov2_vits14_reg4", registers=True),
    EfficientNetLiteSpec("efficientnet_lite0"),
    EfficientNetLiteSpec("efficientnet_lite1"),
    EfficientNetLiteSpec("efficientnet_lite2"),
)}
FALLBACK = "efficientnet_lite0"  # `auto` without DINOv2 weights
BACKBONES = ("auto", *REGISTRY)


def spec_of(name: str) -> BackboneSpec:
    """The spec of a backbone name (`auto` reads as its fallback for block checks)."""
    if name == "auto":
        return REGISTRY[FALLBACK]
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return REGISTRY[name]
