"""MobileOne (Vasu et al., "An Improved One Millisecond Mobile Backbone", CVPR 2023): its block family and network.

The network follows timm's ``mobileone_s0`` ... ``mobileone_s4`` (the authors' released models) layer for layer, and
its state dict differs from timm's only by where the block sits inside each layer, so timm weights load after one
rename (``from_timm_key``):

    timm                                            repq
    stem.{conv_kxk.I, conv_scale}.{conv, bn}.*      stem.block.{conv_kxk.I, conv_scale}.{conv, bn}.*
    stages.S.L.conv_kxk.I.{conv, bn}.*              stages.S.L.block.conv_kxk.I.{conv, bn}.*
    stages.S.L.conv_scale.{conv, bn}.*              stages.S.L.block.conv_scale.{conv, bn}.*
    stages.S.L.identity.*                           stages.S.L.block.identity.*
    stages.S.L.reparam_conv.* (deploy form)         stages.S.L.block.reparam_conv.*
    stages.S.L.attn.{fc1, fc2}.* (S4's SE)          the same
    head.fc.*                                       the same

Activations and SE sit outside the block (``MobileOneLayer``), as for every repq block, so RepQ wraps the block
alone and quantizes exactly the kernel that is deployed.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.block import BNStats, BNTap, ConvBN, ReparamBlock, stats_for
from repq.reparam.kernels import Kernel, bn_fold, identity_kernel, pad_to


class MobileOneBlock(ReparamBlock):
    """MobileOne's block: ``num_conv_branches`` over-parametrized kxk conv-BN branches, a 1x1 conv-BN scale branch
    (when k > 1) and an identity BN (when shapes allow). ``groups=channels`` is the depthwise form, ``kernel_size=1``
    the pointwise form (no scale branch)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 deploy: bool = False, num_conv_branches: int = 1):
        if num_conv_branches < 1:
            raise RepqError(f"MobileOneBlock needs num_conv_branches >= 1, got {num_conv_branches}")
        self.num_conv_branches = num_conv_branches
        super().__init__(in_channels, out_channels, kernel_size, stride, groups, deploy)

    def _validate(self, in_channels, out_channels, kernel_size, stride, groups) -> None:
        # 1x1 is MobileOne's pointwise form; every other rule is the base class's.
        super()._validate(in_channels, out_channels, 3 if kernel_size == 1 else kernel_size, stride, groups)

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g = self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups
        self.conv_kxk = nn.ModuleList(ConvBN(c_in, c_out, k, s, self.padding, g)
                                      for _ in range(self.num_conv_branches))
        self.conv_scale = ConvBN(c_in, c_out, 1, s, 0, g) if k > 1 else None
        self.identity = nn.BatchNorm2d(c_out) if c_in == c_out and s == 1 else None

    def _train_forward(self, x: Tensor) -> Tensor:
        # timm's order of summation (scale, kxk branches, identity), so float32 outputs match it closely
        out = self.conv_scale(x) if self.conv_scale is not None else 0
        for branch in self.conv_kxk:
            out = out + branch(x)
        return out + self.identity(x) if self.identity is not None else out

    def bn_taps(self) -> dict[str, BNTap]:
        taps = {f"conv_kxk.{i}": branch.tap() for i, branch in enumerate(self.conv_kxk)}
        if self.conv_scale is not None:
            taps["conv_scale"] = self.conv_scale.tap()
        if self.identity is not None:
            bn, channels, groups = self.identity, self.out_channels, self.groups
            taps["identity"] = BNTap(bn, lambda stats=None: (identity_kernel(channels, groups, like=bn.running_var),
                                                             None), 1, 0, groups)
        return taps

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        pieces = {f"conv_kxk.{i}": branch.folded(bn_stats, f"conv_kxk.{i}") for i, branch in enumerate(self.conv_kxk)}
        if self.conv_scale is not None:
            weight, bias = self.conv_scale.folded(bn_stats, "conv_scale")
            pieces["conv_scale"] = (pad_to(weight, self.kernel_hw), bias)
        if self.identity is not None:
            ident = identity_kernel(self.out_channels, self.groups, self.kernel_hw, like=self.identity.running_var)
            pieces["identity"] = bn_fold(ident, None, self.identity, stats_for(bn_stats, "identity"))
        return pieces

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_conv_branches={self.num_conv_branches}"


def _divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(value / divisor + 0.5) * divisor)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018) as MobileOne-S4 uses it: global average, 1x1 conv to a
    sixteenth of the channels (a multiple of 8), ReLU, 1x1 conv back, sigmoid gate on the input."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        reduced = _divisible(channels / reduction)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class MobileOneLayer(nn.Module):
    """One MobileOne layer: the re-param block, then SE (S4's last layers) and ReLU."""

    def __init__(self, block: MobileOneBlock, se: bool = False):
        super().__init__()
        self.block = block
        self.attn = SqueezeExcite(block.out_channels) if se else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.attn(self.block(x)))


@dataclass(frozen=True)
class MobileOneConfig:
    """A MobileOne variant (paper, Table 7): width factors of the four stages (of 64, 128, 256, 512 channels),
    the number of kxk branches, how many of each stage's last units carry SE, and the units per stage (a unit is
    a depthwise layer then a pointwise layer)."""

    widths: tuple[float, float, float, float]
    num_conv_branches: int = 1
    se_units: tuple[int, int, int, int] = (0, 0, 0, 0)
    depths: tuple[int, int, int, int] = (2, 8, 10, 1)


MOBILEONE_CONFIGS: dict[str, MobileOneConfig] = {
    "s0": MobileOneConfig((0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    "s1": MobileOneConfig((1.5, 1.5, 2.0, 2.5)),
    "s2": MobileOneConfig((1.5, 2.0, 2.5, 4.0)),
    "s3": MobileOneConfig((2.0, 2.5, 3.0, 4.0)),
    "s4": MobileOneConfig((3.0, 3.5, 3.5, 4.0), se_units=(0, 0, 5, 1)),
}


class MobileOneNet(nn.Module):
    """MobileOne: a stem layer, four stages of (depthwise 3x3, pointwise 1x1) layer pairs, GAP + linear.

    ``cifar=True`` keeps full resolution in the stem and the first stage (three downsamplings instead of five), for
    32x32 inputs; ``width_mult`` scales every width (to multiples of 8), for small test and CPU models.
    """

    def __init__(self, config: MobileOneConfig, num_classes: int = 1000, cifar: bool = False,
                 width_mult: float = 1.0, in_chans: int = 3, deploy: bool = False):
        super().__init__()
        widths = [_divisible(base * factor * width_mult) for base, factor in zip((64, 128, 256, 512), config.widths,
                                                                                  strict=True)]
        c_in = _divisible(min(64.0, 64 * config.widths[0]) * width_mult)
        self.stem = MobileOneLayer(MobileOneBlock(in_chans, c_in, 3, 1 if cifar else 2, deploy=deploy))
        branches = config.num_conv_branches
        stages = []
        for stage, (depth, c_out, se_units) in enumerate(zip(config.depths, widths, config.se_units, strict=True)):
            layers = []
            for unit in range(depth):
                stride = 2 if unit == 0 and not (cifar and stage == 0) else 1
                se = unit >= depth - se_units
                layers += [MobileOneLayer(MobileOneBlock(c_in, c_in, 3, stride, c_in, deploy, branches), se),
                           MobileOneLayer(MobileOneBlock(c_in, c_out, 1, 1, 1, deploy, branches), se)]
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                              fc=nn.Linear(c_in, num_classes)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


_TIMM_BLOCK_KEY = re.compile(r"^(stem|stages\.\d+\.\d+)\.(conv_kxk|conv_scale|identity|reparam_conv)\.")


def from_timm_key(key: str) -> str:
    """The repq ``MobileOneNet`` key of a timm ``mobileone_*`` state-dict key (see the module docstring)."""
    return _TIMM_BLOCK_KEY.sub(r"\1.block.\2.", key)
