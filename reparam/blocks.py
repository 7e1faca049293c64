"""The re-param block families. Each merges exactly into one kxk conv; activations live outside the blocks.

Papers: RepVGG (Ding et al., CVPR 2021), QARepVGG (Chu et al., AAAI 2024), ACNet (Ding et al., ICCV 2019),
DBB (Ding et al., CVPR 2021), OREPA (Hu et al., CVPR 2022), ECBSR (Zhang et al., ACM MM 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.block import BNStats, BNTap, ConvBN, PointwiseConv, ReparamBlock, copy_bn, silence_bn, stats_for
from repq.reparam.kernels import (
    Kernel,
    avg_kernel,
    bn_fold,
    compose,
    compose_depthwise,
    identity_kernel,
    pad_to,
)


def pad_with(x: Tensor, value: Tensor, pad: int) -> Tensor:
    """Pad ``x`` by ``pad`` pixels with a per-channel ``value`` instead of zeros."""
    value = value.reshape(1, -1, 1, 1)
    return F.pad(x - value, [pad] * 4) + value


def _load_main(branch: ConvBN, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        branch.conv.weight.copy_(conv.weight)
    copy_bn(branch.bn, bn, conv.bias)


def _identity_tap(bn: nn.BatchNorm2d, channels: int, groups: int) -> BNTap:
    def kernel(stats=None):
        return identity_kernel(channels, groups, like=bn.running_var), None

    return BNTap(bn, kernel, 1, 0, groups)


class PlainBlock(ReparamBlock):
    """One kxk conv-BN, no extra branches: the baseline trained without re-parametrization (RepQ's Plain,
    RepVGG's VGG-style plain model). It fuses like the others (BN folded), so every tool treats it alike."""

    def _build_branches(self) -> None:
        self.conv_bn = ConvBN(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                              self.groups)

    def _train_forward(self, x: Tensor) -> Tensor:
        return self.conv_bn(x)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.conv_bn, conv, bn)

    def bn_taps(self) -> dict[str, BNTap]:
        return {"conv_bn": self.conv_bn.tap()}

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        return self.conv_bn.folded(bn_stats, "conv_bn")


class RepVGGBlock(ReparamBlock):
    """kxk conv-BN + 1x1 conv-BN + identity-BN (identity only when shapes allow)."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g = self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups
        self.rbr_dense = ConvBN(c_in, c_out, k, s, self.padding, g)
        self.rbr_1x1 = ConvBN(c_in, c_out, 1, s, 0, g)
        self.rbr_identity = nn.BatchNorm2d(c_out) if c_in == c_out and s == 1 else None

    def _train_forward(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        return out + self.rbr_identity(x) if self.rbr_identity is not None else out

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.rbr_dense, conv, bn)
        silence_bn(self.rbr_1x1.bn)
        if self.rbr_identity is not None:
            silence_bn(self.rbr_identity)

    def bn_taps(self) -> dict[str, BNTap]:
        taps = {"rbr_dense": self.rbr_dense.tap(), "rbr_1x1": self.rbr_1x1.tap()}
        if self.rbr_identity is not None:
            taps["rbr_identity"] = _identity_tap(self.rbr_identity, self.out_channels, self.groups)
        return taps

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        w3, b3 = self.rbr_dense.folded(bn_stats, "rbr_dense")
        w1, b1 = self.rbr_1x1.folded(bn_stats, "rbr_1x1")
        weight, bias = w3 + pad_to(w1, self.kernel_hw), b3 + b1
        if self.rbr_identity is not None:
            ident = identity_kernel(self.out_channels, self.groups, self.kernel_hw, like=w3)
            wi, bi = bn_fold(ident, None, self.rbr_identity, stats_for(bn_stats, "rbr_identity"))
            weight, bias = weight + wi, bias + bi
        return weight, bias

    def custom_l2(self) -> Tensor:
        """RepVGG's L2 on the merged kernel: plain L2 on the kxk ring, and on the centre the L2 of the
        equivalent (BN-scaled) centre of kxk + 1x1, normalised to stay comparable with plain L2."""
        k3, k1 = self.rbr_dense.conv.weight, self.rbr_1x1.conv.weight
        t3 = _bn_scale(self.rbr_dense.bn).detach().reshape(-1, 1, 1, 1)
        t1 = _bn_scale(self.rbr_1x1.bn).detach().reshape(-1, 1, 1, 1)
        c = self.kernel_size // 2
        centre = k3[:, :, c:c + 1, c:c + 1]
        ring = (k3 ** 2).sum() - (centre ** 2).sum()
        equivalent = centre * t3 + k1 * t1
        return ring + (equivalent ** 2 / (t3 ** 2 + t1 ** 2)).sum()


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


class QARepVGGBlock(ReparamBlock):
    """QARepVGG: kxk conv-BN + 1x1 conv (no BN) + bare identity, then one BN after the sum."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g = self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups
        self.rbr_dense = ConvBN(c_in, c_out, k, s, self.padding, g)
        self.rbr_1x1 = PointwiseConv(c_in, c_out, s, g)
        self.has_identity = c_in == c_out and s == 1
        self.post_bn = nn.BatchNorm2d(c_out)

    def _train_forward(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        return self.post_bn(out + x if self.has_identity else out)

    def _pre_bn_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        w3, b3 = self.rbr_dense.folded(bn_stats, "rbr_dense")
        weight = w3 + pad_to(self.rbr_1x1.weight, self.kernel_hw)
        if self.has_identity:
            weight = weight + identity_kernel(self.out_channels, self.groups, self.kernel_hw, like=w3)
        return weight, b3

    def bn_taps(self) -> dict[str, BNTap]:
        return {"rbr_dense": self.rbr_dense.tap(),
                "post_bn": BNTap(self.post_bn, self._pre_bn_kernel, self.stride, self.padding, self.groups)}

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        weight, bias = self._pre_bn_kernel(bn_stats)
        return bn_fold(weight, bias, self.post_bn, stats_for(bn_stats, "post_bn"))


class ACBlock(ReparamBlock):
    """ACNet's asymmetric convolution block: kxk, 1xk and kx1 convs, each with BN."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g, p = (self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                   self.groups, self.padding)
        self.square = ConvBN(c_in, c_out, (k, k), s, (p, p), g)
        self.hor = ConvBN(c_in, c_out, (1, k), s, (0, p), g)
        self.ver = ConvBN(c_in, c_out, (k, 1), s, (p, 0), g)

    def _train_forward(self, x: Tensor) -> Tensor:
        return self.square(x) + self.hor(x) + self.ver(x)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.square, conv, bn)
        silence_bn(self.hor.bn)
        silence_bn(self.ver.bn)

    def bn_taps(self) -> dict[str, BNTap]:
        return {"square": self.square.tap(), "hor": self.hor.tap(), "ver": self.ver.tap()}

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        weight, bias = 0, 0
        for name in ("square", "hor", "ver"):
            w, b = getattr(self, name).folded(bn_stats, name)
            weight, bias = weight + pad_to(w, self.kernel_hw), bias + b
        return weight, bias


class BNAndPad(nn.Module):
    """BN whose output is padded with the value BN gives a zero input (DBB), so a following unpadded conv
    equals a conv of the zero-padded block input: the merge stays exact at the borders."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        if self.bn.training:
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = self.bn.running_mean, self.bn.running_var
        value = self.bn.bias - mean * self.bn.weight * torch.rsqrt(var + self.bn.eps)
        return pad_with(out, value, self.pad)


class IdentityBased1x1(nn.Conv2d):
    """A 1x1 conv parametrised as identity + W (DBB/OREPA), so the branch starts as a pass-through."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        nn.init.zeros_(self.weight)
        self.register_buffer("eye", identity_kernel(channels, groups, like=self.weight.detach()), persistent=False)

    def effective_weight(self) -> Tensor:
        return self.weight + self.eye

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), None, 1, 0, 1, self.groups)


class DBBlock(ReparamBlock):
    """Diverse Branch Block: kxk-BN, 1x1-BN, 1x1-BN-avg-BN and 1x1-BN-kxk-BN branches."""

    def _build_branches(self) -> None:
        c_in, c_out, k, s, g, p = (self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                   self.groups, self.padding)
        if g >= c_out and c_in != c_out:
            raise RepqError(f"DBBlock with groups={g} >= out_channels needs in == out channels, got {c_in}->{c_out}")
        self.depthwise = g >= c_out
        self.origin = ConvBN(c_in, c_out, k, s, p, g)
        if not self.depthwise:
            self.one = ConvBN(c_in, c_out, 1, s, 0, g)
            self.avg_conv = nn.Conv2d(c_in, c_out, 1, 1, 0, groups=g, bias=False)
            self.avg_pad = BNAndPad(c_out, p)
        self.avg_bn = nn.BatchNorm2d(c_out)
        internal = c_in if not self.depthwise else 2 * c_in
        self.kk_1x1 = IdentityBased1x1(c_in, g) if internal == c_in else nn.Conv2d(c_in, internal, 1, groups=g,
                                                                                    bias=False)
        self.kk_pad = BNAndPad(internal, p)
        self.kk_conv = nn.Conv2d(internal, c_out, k, s, 0, groups=g, bias=False)
        self.kk_bn = nn.BatchNorm2d(c_out)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        _load_main(self.origin, conv, bn)
        for branch_bn in (self.avg_bn, self.kk_bn) + (() if self.depthwise else (self.one.bn,)):
            silence_bn(branch_bn)

    def _kk_first_weight(self) -> Tensor:
        return self.kk_1x1.effective_weight() if isinstance(self.kk_1x1, IdentityBased1x1) else self.kk_1x1.weight

    def _train_forward(self, x: Tensor) -> Tensor:
        k, s, p = self.kernel_size, self.stride, self.padding
        out = self.origin(x)
        if self.depthwise:
            out = out + self.avg_bn(F.avg_pool2d(x, k, s, p))
        else:
            out = out + self.one(x)
            out = out + self.avg_bn(F.avg_pool2d(self.avg_pad(self.avg_conv(x)), k, s, 0))
        inner = self.kk_pad(F.conv2d(x, self._kk_first_weight(), None, 1, 0, 1, self.groups))
        return out + self.kk_bn(self.kk_conv(inner))

    # Kernels of the BN inputs, as convs of the block input.
    def _avg_input(self, bn_stats=None) -> Kernel:
        hw = self.kernel_hw
        if self.depthwise:
            return avg_kernel(self.in_channels, self.groups, hw, like=self.origin.conv.weight), None
        w, b = bn_fold(self.avg_conv.weight, None, self.avg_pad.bn, stats_for(bn_stats, "avg_pad"))
        return w.expand(-1, -1, *hw) / (hw[0] * hw[1]), b

    def _kk_input(self, bn_stats=None) -> Kernel:
        first = bn_fold(self._kk_first_weight(), None, self.kk_pad.bn, stats_for(bn_stats, "kk_pad"))
        return compose(first, (self.kk_conv.weight, None), self.groups)

    def bn_taps(self) -> dict[str, BNTap]:
        s, p, g = self.stride, self.padding, self.groups
        taps = {"origin": self.origin.tap()}
        if not self.depthwise:
            taps["one"] = self.one.tap()
            avg_conv = self.avg_conv
            taps["avg_pad"] = BNTap(self.avg_pad.bn, lambda stats=None: (avg_conv.weight, None), 1, 0, g)
        taps["avg_bn"] = BNTap(self.avg_bn, self._avg_input, s, p, g)
        taps["kk_pad"] = BNTap(self.kk_pad.bn, lambda stats=None: (self._kk_first_weight(), None), 1, 0, g)
        taps["kk_bn"] = BNTap(self.kk_bn, self._kk_input, s, p, g)
        return taps

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        weight, bias = self.origin.folded(bn_stats, "origin")
        branches = [bn_fold(*self._avg_input(bn_stats), self.avg_bn, stats_for(bn_stats, "avg_bn")),
                    bn_fold(*self._kk_input(bn_stats), self.kk_bn, stats_for(bn_stats, "kk_bn"))]
        if not self.depthwise:
            w1, b1 = self.one.folded(bn_stats, "one")
            branches.append((pad_to(w1, self.kernel_hw), b1))
        for w, b in branches:
            weight, bias = weight + w, bias + b
        return weight, bias


class OREPABlock(ReparamBlock):
    """Online re-parametrization: linearly scaled branches (kxk, 1x1, 1x1-avg, 1x1-kxk) merged into one kernel
    during training too, followed by one BN."""

    BRANCHES = ("origin", "one", "avg", "one_kxk")

    def _build_branches(self) -> None:
        c_in, c_out, k, g = self.in_channels, self.out_channels, self.kernel_size, self.groups
        per_group = c_in // g
        self.weight_origin = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, k, k), a=5 ** 0.5))
        self.weight_one = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, 1, 1), a=1.0))
        self.weight_avg = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, 1, 1), a=1.0))
        self.one_kxk_first = IdentityBased1x1(c_in, g)
        self.weight_one_kxk = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(c_out, per_group, k, k), a=5 ** 0.5))
        # Branch scales: the origin starts at 1, the others small but non-zero so every branch learns.
        self.branch_scale = nn.Parameter(torch.tensor([1.0, 0.25, 0.25, 0.25]).repeat(c_out, 1).T.contiguous())
        self.bn = nn.BatchNorm2d(c_out)

    def load_conv_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        with torch.no_grad():
            self.weight_origin.copy_(conv.weight)
            self.branch_scale.zero_()
            self.branch_scale[0] = 1.0
        copy_bn(self.bn, bn, conv.bias)

    def _pre_bn_kernel(self, bn_stats=None) -> Kernel:
        hw = self.kernel_hw
        one_kxk, _ = compose((self.one_kxk_first.effective_weight(), None), (self.weight_one_kxk, None), self.groups)
        avg = self.weight_avg.expand(-1, -1, *hw) / (hw[0] * hw[1])
        kernels = (self.weight_origin, pad_to(self.weight_one, hw), avg, one_kxk)
        scaled = zip(self.branch_scale, kernels, strict=True)
        weight = sum(scale.reshape(-1, 1, 1, 1) * kernel for scale, kernel in scaled)
        return weight, None

    def _train_forward(self, x: Tensor) -> Tensor:
        weight, _ = self._pre_bn_kernel()
        return self.bn(F.conv2d(x, weight, None, **self.conv_kwargs()))

    def bn_taps(self) -> dict[str, BNTap]:
        return {"bn": BNTap(self.bn, self._pre_bn_kernel, self.stride, self.padding, self.groups)}

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        return bn_fold(*self._pre_bn_kernel(), self.bn, stats_for(bn_stats, "bn"))


def _edge_masks(like: Tensor) -> dict[str, Tensor]:
    sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return {"sbx": sobel_x.to(like), "sby": sobel_x.T.contiguous().to(like), "lpl": laplacian.to(like)}


class ECBlock(ReparamBlock):
    """ECBSR's edge-oriented convolution block (no BN): 3x3, 1x1->3x3, 1x1->Sobel-x, 1x1->Sobel-y,
    1x1->Laplacian, and an optional identity. The 1x1->3x3 intermediate map is padded with the 1x1 bias so the
    merge is exact at the borders."""

    SUPPORTED_STRIDES = (1,)

    def __init__(self, in_channels: int, out_channels: int, depth_multiplier: float = 2.0, with_identity=False,
                 deploy: bool = False):
        self.mid_channels = int(out_channels * depth_multiplier)
        self.with_identity = with_identity and in_channels == out_channels
        super().__init__(in_channels, out_channels, 3, 1, 1, deploy)

    def _build_branches(self) -> None:
        c_in, c_out, mid = self.in_channels, self.out_channels, self.mid_channels
        self.conv3x3 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.expand_1x1 = nn.Conv2d(c_in, mid, 1)
        self.expand_3x3 = nn.Conv2d(mid, c_out, 3)
        for name in ("sbx", "sby", "lpl"):
            # No bias: the edge masks sum to zero, so a bias before them would never reach the output.
            setattr(self, f"{name}_1x1", nn.Conv2d(c_in, c_out, 1, bias=False))
            setattr(self, f"{name}_scale", nn.Parameter(torch.randn(c_out, 1, 1, 1) * 1e-3))
            setattr(self, f"{name}_bias", nn.Parameter(torch.randn(c_out) * 1e-3))
        for name, mask in _edge_masks(self.expand_1x1.weight.detach()).items():
            self.register_buffer(f"{name}_mask", mask.expand(c_out, 1, 3, 3).clone(), persistent=False)

    def _edge_depthwise(self, name: str) -> Kernel:
        return getattr(self, f"{name}_scale") * getattr(self, f"{name}_mask"), getattr(self, f"{name}_bias")

    def _train_forward(self, x: Tensor) -> Tensor:
        out = self.conv3x3(x)
        out = out + self.expand_3x3(pad_with(self.expand_1x1(x), self.expand_1x1.bias, 1))
        for name in ("sbx", "sby", "lpl"):
            conv1x1 = getattr(self, f"{name}_1x1")
            inner = F.pad(conv1x1(x), [1] * 4)
            weight, bias = self._edge_depthwise(name)
            out = out + F.conv2d(inner, weight, bias, groups=self.out_channels)
        return out + x if self.with_identity else out

    def merged_kernel(self, bn_stats: BNStats | None = None) -> Kernel:
        weight, bias = self.conv3x3.weight, self.conv3x3.bias
        w, b = compose((self.expand_1x1.weight, self.expand_1x1.bias),
                       (self.expand_3x3.weight, self.expand_3x3.bias), 1)
        weight, bias = weight + w, bias + b
        for name in ("sbx", "sby", "lpl"):
            conv1x1 = getattr(self, f"{name}_1x1")
            w, b = compose_depthwise((conv1x1.weight, None), self._edge_depthwise(name))
            weight, bias = weight + w, bias + b
        if self.with_identity:
            weight = weight + identity_kernel(self.out_channels, 1, (3, 3), like=weight)
        return weight, bias


BLOCKS: dict[str, type[ReparamBlock]] = {
    "plain": PlainBlock,
    "repvgg": RepVGGBlock,
    "qarepvgg": QARepVGGBlock,
    "acb": ACBlock,
    "dbb": DBBlock,
    "orepa": OREPABlock,
    "ecb": ECBlock,
}
