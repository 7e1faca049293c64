"""Test-side reference modules in other code bases' layouts, written from their documented structure (module and
key names, forward order), not from repq: the official RepVGG network (DingXiaoH/RepVGG: ``stage0``..``stage4``,
``linear``; blocks with ``rbr_dense``/``rbr_1x1`` conv-BN branches, an ``rbr_identity`` BN, ``se`` and
``nonlinearity``, ``rbr_reparam`` once deployed) and YOLOv6's QARepVGGBlock (a bare 1x1 conv, a bare identity,
the post-BN ``bn``, which its deploy form keeps after ``rbr_reparam``). Their own deploy conversion is computed
here with plain tensor algebra, independently of repq's merge code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(c_in: int, c_out: int, k: int, stride: int, padding: int, groups: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(c_out))
    return seq


def _fold(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    return weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


def _eye(channels: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 3, 3, dtype=like.dtype)
    for c in range(channels):
        kernel[c, c % per_group, 1, 1] = 1.0
    return kernel


class RefSEBlock(nn.Module):
    """The official code's SEBlock (D2se): ``down``/``up`` 1x1 convs with bias on the average-pooled input, ReLU
    between, a sigmoid gate; internal neurons = channels // 16."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)

    def forward(self, x):
        gate = F.avg_pool2d(x, kernel_size=x.size(3))
        return x * torch.sigmoid(self.up(F.relu(self.down(gate))))


class RefRepVGGBlock(nn.Module):
    """The official RepVGG block (also YOLOv6's RepVGGBlock): ReLU(se(dense + 1x1 + identity))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None,
                 use_se: bool = False):
        super().__init__()
        self.c_in, self.groups = c_in, groups
        self.nonlinearity = act if act is not None else nn.ReLU()
        self.se = RefSEBlock(c_out, c_out // 16) if use_se else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.rbr_dense = conv_bn(c_in, c_out, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(c_in, c_out, 1, stride, 0, groups)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + identity))

    @torch.no_grad()
    def switch_to_deploy(self):
        w3, b3 = _fold(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        w1, b1 = _fold(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        weight, bias = w3 + F.pad(w1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            wi, bi = _fold(_eye(self.c_in, self.groups, weight), self.rbr_identity)
            weight, bias = weight + wi, bias + bi
        self._deploy(weight, bias)

    def _deploy(self, weight, bias):
        """The fused kernel becomes ``rbr_reparam``; the branches go, as the authors' switch_to_deploy does."""
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups)
        self.rbr_reparam.weight.copy_(weight)
        self.rbr_reparam.bias.copy_(bias)
        del self.rbr_dense, self.rbr_1x1
        if hasattr(self, "rbr_identity"):
            del self.rbr_identity


class RefQARepVGGBlock(RefRepVGGBlock):
    """YOLOv6's QARepVGGBlock: ReLU(bn(dense + 1x1 conv + x)); deployed, ReLU(bn(rbr_reparam(x)))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
        super().__init__(c_in, c_out, stride, groups, act)
        self.bn = nn.BatchNorm2d(c_out)
        self.rbr_1x1 = nn.Conv2d(c_in, c_out, 1, stride, groups=groups, bias=False)
        self.rbr_identity = nn.Identity() if c_in == c_out and stride == 1 else None

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(x))))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + identity)))

    @torch.no_grad()
    def switch_to_deploy(self):
        weight, bias = _fold(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        weight = weight + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if self.rbr_identity is not None:
            weight = weight + _eye(self.c_in, self.groups, weight)
        self._deploy(weight, bias)


# The official code's model zoo (its func_dict): depths, width multipliers, group-wise layers, SE (D2se).
OFFICIAL_VARIANTS = {
    "a0": ((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), 1), "a1": ((2, 4, 14, 1), (1, 1, 1, 2.5), 1),
    "a2": ((2, 4, 14, 1), (1.5, 1.5, 1.5, 2.75), 1), "b0": ((4, 6, 16, 1), (1, 1, 1, 2.5), 1),
    "b1": ((4, 6, 16, 1), (2, 2, 2, 4), 1), "b1g2": ((4, 6, 16, 1), (2, 2, 2, 4), 2),
    "b1g4": ((4, 6, 16, 1), (2, 2, 2, 4), 4), "b2": ((4, 6, 16, 1), (2.5, 2.5, 2.5, 5), 1),
    "b2g2": ((4, 6, 16, 1), (2.5, 2.5, 2.5, 5), 2), "b2g4": ((4, 6, 16, 1), (2.5, 2.5, 2.5, 5), 4),
    "b3": ((4, 6, 16, 1), (3, 3, 3, 5), 1), "b3g2": ((4, 6, 16, 1), (3, 3, 3, 5), 2),
    "b3g4": ((4, 6, 16, 1), (3, 3, 3, 5), 4), "d2se": ((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), 1, True),
}


class RefRepVGG(nn.Module):
    """The official network: stage0 (stem block), stage1..4, global pool, linear."""

    def __init__(self, variant: str = "a0", num_classes: int = 1000, block=RefRepVGGBlock):
        super().__init__()
        depths, widths, groups, *se = OFFICIAL_VARIANTS[variant]
        extra = {"use_se": True} if se else {}
        planes = min(64, int(64 * widths[0]))
        self.stage0 = block(3, planes, 2, **extra)
        layer = 1
        for s, (depth, base) in enumerate(zip(depths, (64, 128, 256, 512), strict=True), start=1):
            out, blocks = int(base * widths[s - 1]), []
            for i in range(depth):
                blocks.append(block(planes, out, 2 if i == 0 else 1, groups if layer % 2 == 0 and layer <= 26 else 1,
                                    **extra))
                planes, layer = out, layer + 1
            setattr(self, f"stage{s}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        for s in range(5):
            x = getattr(self, f"stage{s}")(x)
        return self.linear(self.gap(x).flatten(1))

    def switch_to_deploy(self):
        for module in list(self.modules()):
            if isinstance(module, RefRepVGGBlock):
                module.switch_to_deploy()
        return self


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight and BN statistic random (BNs close to unit gain, so activations stay O(1) through depth)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(0.3, 0.8, generator=gen)
            module.bias.uniform_(-0.3, 0.3, generator=gen)
            module.running_mean.uniform_(-0.3, 0.3, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
            module.num_batches_tracked.fill_(7)
        elif isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0, fan_in ** -0.5, generator=gen)
            if module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=gen)
    return model.eval()


class TinyDetector(nn.Module):
    """A detector-shaped net of YOLOv6-style blocks: a backbone, a neck (upsample + concat), two heads."""

    def __init__(self, block=RefRepVGGBlock, qa_block=RefQARepVGGBlock, classes: int = 3):
        super().__init__()
        self.stem = block(3, 8, 2)
        self.dark2 = nn.Sequential(block(8, 16, 2), qa_block(16, 16))
        self.dark3 = nn.Sequential(qa_block(16, 16, 2), block(16, 16))
        self.reduce = nn.Conv2d(16, 8, 1)
        self.neck = nn.Sequential(block(24, 16), qa_block(16, 16))
        self.cls_head = nn.Conv2d(16, classes, 1)
        self.reg_head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        c2 = self.dark2(self.stem(x))
        c3 = self.dark3(c2)
        up = F.interpolate(self.reduce(c3), scale_factor=2.0, mode="nearest")
        feat = self.neck(torch.cat([up, c2], 1))
        return self.cls_head(feat), self.reg_head(feat)
