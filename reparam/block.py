"""What every re-param block shares: the deploy conv, fuse(), and the description of its BNs (taps).

A block subclass implements three things:
- ``_build_branches()``: the training-form modules;
- ``_train_forward(x)``: the multi-branch forward;
- ``merged_kernel(bn_stats=None)``: the deploy conv's (weight, bias) as a differentiable function of the
  block's parameters, or ``branch_kernels(bn_stats=None)``: each branch's share of it (merged_kernel sums them);
and, if it has BatchNorms, ``bn_taps()``: for each BN, the conv of the block input that feeds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.kernels import Kernel, bn_fold

BNStats = dict[str, tuple[Tensor, Tensor]]


@dataclass
class BNTap:
    """One BatchNorm of a block, seen as ``bn(conv(x, *kernel(bn_stats), stride, padding, groups))``.

    ``x`` is the block input. ``kernel`` takes the same ``bn_stats`` as ``merged_kernel`` because an outer BN's
    input kernel (QARepVGG's post-BN, DBB's second BN) contains inner BNs folded with those statistics.
    RepQ-BN runs this conv to get batch statistics; RepQ-BNEst estimates them from the kernel alone.
    """

    bn: nn.BatchNorm2d
    kernel: Callable[[BNStats | None], Kernel]
    stride: int | tuple[int, int]
    padding: int | tuple[int, int]
    groups: int


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class ReparamBlock(nn.Module):
    """Base of all re-param blocks. ``deploy=True`` builds the fused form directly (to load fused weights)."""

    SUPPORTED_STRIDES = (1, 2)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, deploy: bool = False):
        super().__init__()
        self._validate(in_channels, out_channels, kernel_size, stride, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.padding = kernel_size // 2
        self.deployed = deploy
        if deploy:
            self.reparam_conv = self._deploy_conv()
        else:
            self._build_branches()

    # -- validation -------------------------------------------------------------------------------------
    def _validate(self, in_channels, out_channels, kernel_size, stride, groups) -> None:
        name = type(self).__name__
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise RepqError(f"{name} needs an odd kernel size >= 3, got {kernel_size}: use 3, 5 or 7")
        if stride not in self.SUPPORTED_STRIDES:
            raise RepqError(f"{name} supports stride {self.SUPPORTED_STRIDES}, got {stride}: "
                            f"downsample with a separate layer")
        if in_channels % groups or out_channels % groups:
            raise RepqError(f"{name}: channels {in_channels}->{out_channels} are not divisible by "
                            f"groups={groups}: pick channel counts that are multiples of the groups")

    # -- interface --------------------------------------------------------------------------------------
    def conv_kwargs(self) -> dict:
        """Geometry of the deploy conv, for ``F.conv2d(x, weight, bias, **block.conv_kwargs())``."""
        return {"stride": self.stride, "padding": self.padding, "groups": self.groups}

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        """The deploy conv's (weight, bias): by default the sum of ``branch_kernels``."""
        if type(self).branch_kernels is ReparamBlock.branch_kernels:
            raise NotImplementedError(f"{type(self).__name__} defines neither merged_kernel nor branch_kernels")
        return sum_kernels(self.branch_kernels(bn_stats).values())

    def branch_kernels(self, bn_stats: BNStats | None = None) -> dict[str, Kernel]:
        """Each branch's share of the deploy conv, by branch name; the shares sum to ``merged_kernel()``. What
        tells which branch made a fused-kernel outlier (repq doctor). A block that only defines
        ``merged_kernel()`` is one share, ``merged``."""
        if type(self).merged_kernel is ReparamBlock.merged_kernel:
            raise NotImplementedError(f"{type(self).__name__} defines neither merged_kernel nor branch_kernels")
        return {"merged": self.merged_kernel(bn_stats)}

    def bn_taps(self) -> dict[str, BNTap]:
        return {}

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        """Initialise the training form to compute ``bn(conv(x))`` exactly (used by convert_convs)."""
        raise RepqError(f"{type(self).__name__} cannot be initialised from a plain conv + BN: "
                        f"convert with one of acb, dbb, orepa, repvgg, plain")

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.reparam_conv(x)
        return self._train_forward(x)

    def fuse(self) -> ReparamBlock:
        """Turn this block into its deploy form in place (idempotent) and return it."""
        self._check_not_half_fused()
        if self.deployed:
            return self
        with torch.no_grad():
            weight, bias = self.merged_kernel()
        conv = self._deploy_conv().to(device=weight.device, dtype=weight.dtype)
        conv.weight.data.copy_(weight)
        conv.bias.data.copy_(bias)
        for name in list(self._modules):
            delattr(self, name)
        for name in list(self._parameters):
            delattr(self, name)
        for name in list(self._buffers):
            delattr(self, name)
        self.reparam_conv = conv
        self.deployed = True
        return self

    # -- helpers ----------------------------------------------------------------------------------------
    def _deploy_conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         groups=self.groups, bias=True)

    def _check_not_half_fused(self) -> None:
        has_conv = "reparam_conv" in self._modules
        has_branches = any(name != "reparam_conv" for name in self._modules) or bool(self._parameters)
        if self.deployed != has_conv or (has_conv and has_branches):
            raise RepqError(f"{type(self).__name__} is half-fused (deploy conv present: {has_conv}, training "
                            f"branches present: {has_branches}): rebuild the model from its checkpoint and fuse "
                            f"it with reparam.fuse_model")

    @property
    def kernel_hw(self) -> tuple[int, int]:
        return (self.kernel_size, self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, deployed={self.deployed}")


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv (no padding), the same output and gradients as nn.Conv2d. With few input channels it applies
    its stride by subsampling the input first, because oneDNN's weight gradient of a strided 1x1 conv on a
    channels-last input that narrow hangs or crashes (README, "Measurements behind the defaults"); wider inputs
    keep the strided kernel, which saves a copy forward and a scatter backward."""

    SUBSAMPLE_BELOW_CHANNELS = 16  # an AVX-512 register of float32

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, 1, stride, 0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        sh, sw = self.stride
        if (sh, sw) == (1, 1) or self.in_channels // self.groups >= self.SUBSAMPLE_BELOW_CHANNELS:
            return super().forward(x)
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias, 1, 0, 1, self.groups)


def branch_conv(in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1) -> nn.Conv2d:
    """The bias-free conv of a training branch; 1x1 ones are PointwiseConv."""
    if kernel_size in (1, (1, 1)) and padding in (0, (0, 0)):
        return PointwiseConv(in_channels, out_channels, stride, groups)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)


class ConvBN(nn.Module):
    """conv (no bias) -> BN: the branch most re-param blocks are made of."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
        super().__init__()
        self.conv = branch_conv(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def tap(self) -> BNTap:
        conv = self.conv
        return BNTap(self.bn, lambda stats=None: (conv.weight, None), conv.stride, conv.padding, conv.groups)

    def folded(self, bn_stats: BNStats | None, name: str) -> Kernel:
        return bn_fold(self.conv.weight, None, self.bn, stats_for(bn_stats, name))


def copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, conv_bias: Tensor | None = None) -> None:
    """Make ``dst`` compute what ``src`` computes after a conv with ``conv_bias`` (absorbed into the mean)."""
    with torch.no_grad():
        dst.load_state_dict(src.state_dict())
        if conv_bias is not None:
            dst.running_mean.sub_(conv_bias)
    dst.eps, dst.momentum = src.eps, src.momentum


def silence_bn(bn: nn.BatchNorm2d) -> None:
    """gamma = beta = 0: the branch outputs zero but still learns (gamma gets gradients)."""
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()


def sum_kernels(kernels) -> Kernel:
    """The sum of (weight, bias) pairs, in order (a bias may be None: no bias)."""
    weight, bias = None, None
    for w, b in kernels:
        weight = w if weight is None else weight + w
        if b is not None:
            bias = b if bias is None else bias + b
    if weight is None:
        raise ValueError("sum_kernels needs at least one kernel")
    return weight, bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                             device=weight.device)


def stats_for(bn_stats: BNStats | None, name: str) -> tuple[Tensor, Tensor] | None:
    return (bn_stats or {}).get(name)
